//! Proxies between the daemon and a service: fault injection, and TLS
//! termination and SASL authentication for services without them.

pub mod bulk;
pub mod sasl;
pub mod tcp;
pub mod tls;
