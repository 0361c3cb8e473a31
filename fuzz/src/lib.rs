//! The fuzz targets' code, in a library so each target's file stays a
//! one-line entry point.

pub mod client_hello;
pub mod config;
pub mod policy;
pub mod proxy_header;
pub mod records;
