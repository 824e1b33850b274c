//! Proxies between the daemon and a service: fault injection, and TLS
//! termination for services without TLS of their own.

pub mod bulk;
pub mod tcp;
pub mod tls;
