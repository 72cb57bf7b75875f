// Steers pod TCP traffic into ztunnel's transparent listeners from tc ingress of the
// node-side interfaces (node uplink, node-side veths of pods). One program serves every
// interface; what it does on an interface depends on the role userspace stored for that
// interface's index in `roles`.
//
// Steering = bpf_sk_assign to a socket of the node namespace plus skb->mark |= MARK; the
// node's policy routing (fwmark MARK -> table with `local 0.0.0.0/0 dev lo`) then delivers
// the packet locally, where TCP takes the assigned socket instead of looking one up.
// Packets the program does not steer are left exactly as they came (it never drops).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Values of `roles`; kept in step with `Role::value` in src/lib.rs.
#define ROLE_AMBIENT_POD 1
#define ROLE_INGRESS 2

// Slots of `listeners`; kept in step with `Slot` in src/lib.rs.
#define SLOT_OUTBOUND 0
#define SLOT_HBONE 1
#define SLOT_PLAINTEXT 2

#define HBONE_PORT 15008
#define IP_FRAGMENT_BITS 0x3fff // More-fragments flag and fragment offset.

// Set by the loader before the program is loaded.
volatile const __u32 MARK = 0;

// ztunnel's transparent listeners, by slot. A __u32 value is what aya's SockMap expects.
struct {
    __uint(type, BPF_MAP_TYPE_SOCKMAP);
    __uint(max_entries, 3);
    __type(key, __u32);
    __type(value, __u32);
} listeners SEC(".maps");

// Interface index -> role. Interfaces absent here are not touched.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 8192);
    __type(key, __u32);
    __type(value, __u32);
} roles SEC(".maps");

// IPv4 addresses (network byte order) of ambient pods on this node.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, __u32);
    __type(value, __u32);
} local_ambient SEC(".maps");

// Assigns the packet to `sk` and marks it for local delivery; consumes the reference.
// TC_ACT_OK (= TCX_PASS) ends the hook's program chain: a program after this one must not
// redirect a packet that now belongs to a local socket. If the kernel refuses the
// assignment the packet goes on untouched.
static __always_inline int steer_to(struct __sk_buff *skb, struct bpf_sock *sk)
{
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err)
        return TC_ACT_UNSPEC;
    skb->mark |= MARK;
    return TC_ACT_OK;
}

// The listener for a new connection (a SYN without ACK) under `role`, or -1 for none.
static __always_inline int listener_slot(__u32 role, const struct iphdr *ip, const struct tcphdr *tcp)
{
    if (!tcp->syn || tcp->ack)
        return -1;
    if (role == ROLE_AMBIENT_POD)
        return SLOT_OUTBOUND;
    if (role != ROLE_INGRESS)
        return -1;
    __u32 dst = ip->daddr;
    if (!bpf_map_lookup_elem(&local_ambient, &dst))
        return -1;
    return tcp->dest == bpf_htons(HBONE_PORT) ? SLOT_HBONE : SLOT_PLAINTEXT;
}

// TC_ACT_UNSPEC (= TCX_NEXT) lets any later program on the hook, then the stack, see a
// packet this program leaves alone.
SEC("classifier")
int steer(struct __sk_buff *skb)
{
    __u32 ifindex = skb->ifindex;
    __u32 *role = bpf_map_lookup_elem(&roles, &ifindex);
    if (!role)
        return TC_ACT_UNSPEC;
    __u32 my_role = *role;
    // Node-side interfaces are Ethernet: the IPv4 header follows a 14-byte MAC header.
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_UNSPEC;
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
        return TC_ACT_UNSPEC;
    if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_TCP)
        return TC_ACT_UNSPEC;
    // Fragments are left to the stack: only the first carries the ports.
    if (ip.frag_off & bpf_htons(IP_FRAGMENT_BITS))
        return TC_ACT_UNSPEC;
    struct tcphdr tcp;
    if (bpf_skb_load_bytes(skb, ETH_HLEN + ip.ihl * 4, &tcp, sizeof(tcp)))
        return TC_ACT_UNSPEC;

    // A packet of a connection a node socket already owns goes to that socket: replies to
    // ztunnel's transparent sockets (whose source is a pod address) and the rest of the
    // connections steered below.
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = ip.saddr;
    tuple.ipv4.daddr = ip.daddr;
    tuple.ipv4.sport = tcp.source;
    tuple.ipv4.dport = tcp.dest;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        if (sk->state != BPF_TCP_LISTEN)
            return steer_to(skb, sk);
        bpf_sk_release(sk);
    }

    int slot = listener_slot(my_role, &ip, &tcp);
    if (slot < 0)
        return TC_ACT_UNSPEC;
    __u32 key = slot;
    sk = bpf_map_lookup_elem(&listeners, &key);
    if (!sk)
        return TC_ACT_UNSPEC;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return TC_ACT_UNSPEC;
    }
    return steer_to(skb, sk);
}

char _license[] SEC("license") = "Apache-2.0";
