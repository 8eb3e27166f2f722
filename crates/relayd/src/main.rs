//! `relayd`, the relay server.

fn main() {}
