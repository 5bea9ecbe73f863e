//! TLS plumbing for interception (filled in next).
