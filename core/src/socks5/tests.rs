use super::*;

use std::collections::HashSet;
use std::time::Instant;

use tokio::io::duplex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const GREETING: [u8; 3] = [5, 1, 0];
const ACCEPTED: [u8; 2] = [5, 0];
/// Long enough never to fire in a passing test that expects the handshake to finish.
const GENEROUS: Duration = Duration::from_secs(5);

fn connect_v4(octets: [u8; 4], port: u16) -> Vec<u8> {
    let mut out = vec![5, 1, 0, 1];
    out.extend_from_slice(&octets);
    out.extend_from_slice(&port.to_be_bytes());
    out
}

fn connect_v6(ip: Ipv6Addr, port: u16) -> Vec<u8> {
    let mut out = vec![5, 1, 0, 4];
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&port.to_be_bytes());
    out
}

fn connect_domain(name: &[u8], port: u16) -> Vec<u8> {
    let mut out = vec![5, 1, 0, 3, u8::try_from(name.len()).unwrap()];
    out.extend_from_slice(name);
    out.extend_from_slice(&port.to_be_bytes());
    out
}

fn greeting_and(request: &[u8]) -> Vec<u8> {
    [&GREETING[..], request].concat()
}

/// Runs the handshake against a client that sends `input` then half-closes; returns the
/// result and every byte the server sent back.
async fn run(input: &[u8]) -> (Result<Target, Socks5Error>, Vec<u8>) {
    let (mut client, mut server) = duplex(4096);
    client.write_all(input).await.unwrap();
    client.shutdown().await.unwrap();
    let result = handshake_with_timeout(&mut server, GENEROUS).await;
    drop(server);
    let mut sent = Vec::new();
    client.read_to_end(&mut sent).await.unwrap();
    (result, sent)
}

/// The reply for a request refused before connecting: code, then 0.0.0.0:0.
fn refused(code: u8) -> Vec<u8> {
    vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

#[tokio::test]
async fn ipv4_connect_is_parsed_and_accepted() {
    let (result, sent) = run(&greeting_and(&connect_v4([10, 1, 2, 3], 8080))).await;
    let expected = SocketAddr::from(([10, 1, 2, 3], 8080));
    assert_eq!(result.unwrap(), Target::Addr(expected));
    assert_eq!(sent, ACCEPTED);
}

#[tokio::test]
async fn ipv6_connect_is_parsed_and_accepted() {
    let ip: Ipv6Addr = "fd00::1:2".parse().unwrap();
    let (result, sent) = run(&greeting_and(&connect_v6(ip, 443))).await;
    assert_eq!(result.unwrap(), Target::Addr(SocketAddr::from((ip, 443))));
    assert_eq!(sent, ACCEPTED);
}

#[tokio::test]
async fn domain_connect_is_kept_as_text() {
    let name = b"reviews.default.svc.cluster.local";
    let (result, sent) = run(&greeting_and(&connect_domain(name, 9080))).await;
    let target = result.unwrap();
    assert_eq!(
        target,
        Target::Host {
            host: "reviews.default.svc.cluster.local".to_owned(),
            port: 9080
        }
    );
    assert_eq!(target.to_string(), "reviews.default.svc.cluster.local:9080");
    assert_eq!(target.port(), 9080);
    assert_eq!(sent, ACCEPTED);
}

#[tokio::test]
async fn no_auth_is_picked_among_several_methods() {
    let input = [&[5, 3, 2, 1, 0][..], &connect_v4([127, 0, 0, 1], 80)].concat();
    let (result, sent) = run(&input).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(sent, ACCEPTED);
}

#[tokio::test]
async fn reply_encodes_ipv4_bound_address() {
    let mut out = Vec::new();
    let bound = SocketAddr::from(([10, 0, 0, 1], 15080));
    reply(&mut out, Reply::Succeeded, bound).await.unwrap();
    assert_eq!(out, [5, 0, 0, 1, 10, 0, 0, 1, 58, 232]);
}

#[tokio::test]
async fn reply_encodes_ipv6_bound_address() {
    let mut out = Vec::new();
    let bound = SocketAddr::from((Ipv6Addr::LOCALHOST, 258));
    reply(&mut out, Reply::ConnectionRefused, bound)
        .await
        .unwrap();
    let mut expected = vec![5, 5, 0, 4];
    expected.extend_from_slice(&[0; 15]);
    expected.extend_from_slice(&[1, 1, 2]);
    assert_eq!(out, expected);
}

#[tokio::test]
async fn reply_codes_follow_rfc_1928() {
    for (code, outcome) in (0u8..).zip(Reply::ALL) {
        let mut out = Vec::new();
        let bound = SocketAddr::from(([0, 0, 0, 0], 0));
        reply(&mut out, outcome, bound).await.unwrap();
        assert_eq!(out, refused(code), "{outcome:?}");
    }
}

#[tokio::test]
async fn payload_after_request_is_left_for_the_caller() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let payload = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n";
    // One write, sent before the server reads anything: all of it is waiting at once.
    let all = [
        greeting_and(&connect_v4([10, 9, 8, 7], 80)),
        payload.to_vec(),
    ]
    .concat();
    client.write_all(&all).await.unwrap();
    client.shutdown().await.unwrap();

    let (mut server, _) = listener.accept().await.unwrap();
    let target = handshake_with_timeout(&mut server, GENEROUS).await.unwrap();
    assert_eq!(target, Target::Addr(SocketAddr::from(([10, 9, 8, 7], 80))));
    let bound = server.local_addr().unwrap();
    reply(&mut server, Reply::Succeeded, bound).await.unwrap();
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, payload);
    drop(server);

    let mut sent = Vec::new();
    client.read_to_end(&mut sent).await.unwrap();
    let expected = [&ACCEPTED[..], &[5, 0, 0, 1, 127, 0, 0, 1]].concat();
    assert_eq!(sent[..10], expected);
    assert_eq!(sent[10..], bound.port().to_be_bytes());
}

#[tokio::test]
async fn wrong_version_in_greeting_is_rejected_silently() {
    let (result, sent) = run(&[4, 1, 0]).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, Socks5Error::BadVersion { found: 4, .. }),
        "{err}"
    );
    assert_eq!(err.reason(), "bad_version");
    assert!(sent.is_empty());
}

#[tokio::test]
async fn wrong_version_in_request_is_rejected() {
    let mut request = connect_v4([10, 0, 0, 1], 80);
    request[0] = 4;
    let (result, sent) = run(&greeting_and(&request)).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, Socks5Error::BadVersion { found: 4, .. }),
        "{err}"
    );
    assert_eq!(sent, ACCEPTED);
}

#[tokio::test]
async fn username_password_only_gets_no_acceptable_method() {
    let (result, sent) = run(&[5, 1, 2]).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Socks5Error::NoAcceptableMethod { offered } if offered == &[2]),
        "{err}"
    );
    assert_eq!(err.reason(), "no_acceptable_method");
    assert_eq!(sent, [5, 0xFF]);
}

#[tokio::test]
async fn empty_method_list_gets_no_acceptable_method() {
    let (result, sent) = run(&[5, 0]).await;
    assert!(matches!(
        result,
        Err(Socks5Error::NoAcceptableMethod { .. })
    ));
    assert_eq!(sent, [5, 0xFF]);
}

#[tokio::test]
async fn bind_and_udp_associate_are_refused_with_command_not_supported() {
    for cmd in [2u8, 3] {
        let mut request = connect_v4([10, 0, 0, 1], 80);
        request[1] = cmd;
        let (result, sent) = run(&greeting_and(&request)).await;
        let err = result.unwrap_err();
        assert!(
            matches!(err, Socks5Error::UnsupportedCommand { cmd: c } if c == cmd),
            "{err}"
        );
        assert_eq!(err.reason(), "unsupported_command");
        assert_eq!(sent, [&ACCEPTED[..], &refused(7)].concat());
    }
}

#[tokio::test]
async fn unknown_address_type_is_refused() {
    let (result, sent) = run(&greeting_and(&[5, 1, 0, 2, 1, 2, 3, 4, 0, 80])).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, Socks5Error::UnsupportedAddressType { atyp: 2 }),
        "{err}"
    );
    assert_eq!(err.reason(), "unsupported_address_type");
    assert_eq!(sent, [&ACCEPTED[..], &refused(8)].concat());
}

#[tokio::test]
async fn empty_or_non_utf8_domain_is_refused() {
    for name in [&b""[..], &[0xff, 0xfe, b'a']] {
        let (result, sent) = run(&greeting_and(&connect_domain(name, 80))).await;
        let err = result.unwrap_err();
        assert!(matches!(err, Socks5Error::BadDomain { .. }), "{err}");
        assert_eq!(err.reason(), "bad_domain");
        assert_eq!(sent, [&ACCEPTED[..], &refused(1)].concat());
    }
}

#[tokio::test]
async fn silent_client_times_out() {
    let (_client, mut server) = duplex(64);
    let limit = Duration::from_millis(50);
    let started = Instant::now();
    let err = handshake_with_timeout(&mut server, limit)
        .await
        .unwrap_err();
    assert!(matches!(err, Socks5Error::TimedOut { after } if after == limit));
    assert_eq!(err.reason(), "timed_out");
    assert!(started.elapsed() < GENEROUS);
}

#[tokio::test]
async fn client_stalling_after_greeting_times_out_overall() {
    let (mut client, mut server) = duplex(64);
    client.write_all(&GREETING).await.unwrap();
    let limit = Duration::from_millis(50);
    let err = handshake_with_timeout(&mut server, limit)
        .await
        .unwrap_err();
    assert!(matches!(err, Socks5Error::TimedOut { .. }), "{err}");
    let mut sent = [0u8; 2];
    client.read_exact(&mut sent).await.unwrap();
    assert_eq!(sent, ACCEPTED);
}

#[tokio::test]
async fn truncated_request_is_an_eof_error() {
    let (result, _) = run(&greeting_and(&[5, 1, 0, 1, 10, 0])).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Socks5Error::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
        "{err}"
    );
    assert_eq!(err.reason(), "io");
}

#[tokio::test]
async fn every_prefix_of_a_valid_handshake_is_an_eof_error() {
    let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let complete = [
        greeting_and(&connect_v4([10, 0, 0, 1], 80)),
        greeting_and(&connect_v6(ip, 80)),
        greeting_and(&connect_domain(b"a.example", 80)),
    ];
    for input in &complete {
        for len in 0..input.len() {
            let (result, _) = run(&input[..len]).await;
            assert!(
                matches!(&result, Err(Socks5Error::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof),
                "prefix {:?}: {result:?}",
                &input[..len]
            );
        }
    }
}

#[tokio::test]
async fn arbitrary_bytes_end_the_handshake_without_panic() {
    // A fixed linear congruential generator: reproducible, no extra dependency.
    let mut state: u32 = 0x2545_f491;
    let mut next = move || {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (state >> 24) as u8
    };
    for _ in 0..500 {
        let len = usize::from(next() % 48);
        let mut input: Vec<u8> = (0..len).map(|_| next()).collect();
        // Steer most inputs past the version checks so the deeper parsers are exercised.
        for (i, byte) in [5u8, 1, 0, 5, 1].into_iter().enumerate() {
            if i < input.len() && next() % 4 != 0 {
                input[i] = byte;
            }
        }
        let (result, _) = run(&input).await;
        // The client half-closed, so every outcome must be decided by the bytes, not the clock.
        assert!(
            !matches!(result, Err(Socks5Error::TimedOut { .. })),
            "{input:?}"
        );
    }
}

#[test]
fn reasons_are_distinct() {
    let errors = [
        Socks5Error::BadVersion {
            stage: "greeting",
            found: 4,
        },
        Socks5Error::NoAcceptableMethod { offered: vec![2] },
        Socks5Error::UnsupportedCommand { cmd: 2 },
        Socks5Error::UnsupportedAddressType { atyp: 2 },
        Socks5Error::BadDomain {
            len: 0,
            problem: "empty",
        },
        Socks5Error::TimedOut {
            after: HANDSHAKE_TIMEOUT,
        },
        Socks5Error::Io {
            stage: "read request",
            source: io::ErrorKind::UnexpectedEof.into(),
        },
    ];
    let reasons: HashSet<_> = errors.iter().map(Socks5Error::reason).collect();
    assert_eq!(reasons.len(), errors.len());
}

#[test]
fn reply_names_come_from_the_one_table() {
    for (code, outcome) in (0u8..).zip(Reply::ALL) {
        assert_eq!(Reply::from_code(code), Some(outcome));
        assert_eq!(reply_name(code), outcome.name());
    }
    assert_eq!(reply_name(0x02), "connection not allowed by ruleset");
    assert_eq!(reply_name(0x08), "address type not supported");
    for unassigned in [0x09, 0x80, 0xff] {
        assert_eq!(Reply::from_code(unassigned), None);
        assert_eq!(reply_name(unassigned), "unassigned");
    }
}

// The client side, over TCP on 127.0.0.1: against the server side above, and against a
// scripted proxy for answers the server side never gives.

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const DST: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 2, 10), 8080));

/// A proxy made of this module's server side: answers one client with `outcome`, then
/// echoes until the client half-closes. Yields the target it parsed and the peer it saw.
async fn proxy(outcome: Reply) -> (SocketAddr, JoinHandle<(Target, SocketAddr)>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut tcp, peer) = listener.accept().await.unwrap();
        let target = handshake_with_timeout(&mut tcp, GENEROUS).await.unwrap();
        let bound = tcp.local_addr().unwrap();
        reply(&mut tcp, outcome, bound).await.unwrap();
        if outcome == Reply::Succeeded {
            let (mut r, mut w) = tcp.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
        }
        (target, peer)
    });
    (addr, task)
}

/// A proxy that, for each answer in turn, reads the client's next message (greeting, then
/// an IPv4 request) and writes the answer; then it hangs up. Yields the bytes it read.
async fn scripted(answers: Vec<Vec<u8>>) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        for (len, answer) in [3, 10].into_iter().zip(answers) {
            let mut message = vec![0u8; len];
            tcp.read_exact(&mut message).await.unwrap();
            seen.extend_from_slice(&message);
            tcp.write_all(&answer).await.unwrap();
        }
        seen
    });
    (addr, task)
}

#[tokio::test]
async fn client_connects_from_its_source_ip_and_carries_payload() {
    let (proxy, task) = proxy(Reply::Succeeded).await;
    let src = IpAddr::from([127, 0, 0, 2]);
    let mut stream = connect(src, proxy, DST).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    stream.shutdown().await.unwrap();
    let (target, peer) = task.await.unwrap();
    assert_eq!(target, Target::Addr(DST));
    assert_eq!(peer, stream.local_addr().unwrap());
    assert_eq!(peer.ip(), src);
}

#[tokio::test]
async fn client_asks_for_an_ipv6_destination_as_ipv6() {
    let (proxy, task) = proxy(Reply::Succeeded).await;
    let dst: SocketAddr = "[fd00::1:2]:443".parse().unwrap();
    drop(connect(LOCALHOST, proxy, dst).await.unwrap());
    assert_eq!(task.await.unwrap().0, Target::Addr(dst));
}

#[tokio::test]
async fn client_reports_the_refusal_code_by_name() {
    for outcome in [Reply::NotAllowed, Reply::HostUnreachable] {
        let (proxy, _task) = proxy(outcome).await;
        let err = connect(LOCALHOST, proxy, DST).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::Refused { code } if code == outcome.code()),
            "{err}"
        );
        assert!(err.to_string().contains(outcome.name()), "{err}");
    }
}

#[tokio::test]
async fn client_sends_rfc_1928_bytes_and_leaves_the_payload_unread() {
    // A domain as the bound address, and the first payload bytes in the reply's segment.
    let reply = [&[5, 0, 0, 3, 4][..], b"node", &[0x3a, 0x98], b"hi"].concat();
    let (proxy, task) = scripted(vec![vec![5, 0], reply]).await;
    let mut stream = connect(LOCALHOST, proxy, DST).await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"hi");
    let seen = task.await.unwrap();
    assert_eq!(seen, [5, 1, 0, 5, 1, 0, 1, 127, 0, 2, 10, 0x1f, 0x90]);
}

#[tokio::test]
async fn client_reports_a_proxy_that_hangs_up_before_replying() {
    for (answers, at) in [
        (vec![], "read method selection"),
        (vec![vec![5, 0]], "read reply"),
        (vec![vec![5, 0], vec![5, 0, 0, 1, 10]], "read bound address"),
    ] {
        let (proxy, _task) = scripted(answers).await;
        let err = connect(LOCALHOST, proxy, DST).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::Closed { stage, .. } if stage == at),
            "{at}: {err}"
        );
    }
}

#[tokio::test]
async fn client_rejects_answers_rfc_1928_does_not_allow() {
    let refused_auth = vec![vec![5, 0xff]];
    let old_version = vec![vec![5, 0], vec![4, 0, 0, 1, 0, 0, 0, 0, 0, 0]];
    let bad_address_type = vec![vec![5, 0], vec![5, 0, 0, 2, 0, 0, 0, 0, 0, 0]];
    for (answers, at, what, byte) in [
        (refused_auth, "method selection", "method", 0xff),
        (old_version, "reply", "version", 4),
        (bad_address_type, "reply", "address type", 2),
    ] {
        let (proxy, _task) = scripted(answers).await;
        let err = connect(LOCALHOST, proxy, DST).await.unwrap_err();
        assert!(
            matches!(err, ConnectError::Protocol { stage, field, found }
                if (stage, field, found) == (at, what, byte)),
            "{err}"
        );
    }
}

#[tokio::test]
async fn client_reports_where_it_could_not_dial() {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let proxy = listener.local_addr().unwrap();
    drop(listener);
    let err = connect(LOCALHOST, proxy, DST).await.unwrap_err();
    assert!(
        matches!(&err, ConnectError::Dial { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused),
        "{err}"
    );
    assert!(err.to_string().contains(&proxy.to_string()), "{err}");
}
