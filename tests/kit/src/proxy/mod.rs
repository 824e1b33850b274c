//! Fault proxies between the daemon and a service.

pub mod bulk;
pub mod tcp;
