//! placeholder: being written
#[derive(Debug, Default, serde::Serialize)]
pub struct Policies {}
