//! `appsrv-agent`: see the library documentation.

fn main() {}
