//! Hostile plugins for the test suite, written with the SDK the way an
//! attacker would write them, compiled from `tests/plugins/*` by the build
//! script. Never shipped.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));
