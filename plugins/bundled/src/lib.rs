//! The example plugins shipped with Cloister, compiled from the crates in
//! `plugins/` by this crate's build script and embedded as component bytes.
//! Their identity is their SHA-256 digest, like any other plugin's; being
//! bundled grants them nothing: they are added and approved like any other.

include!(concat!(env!("OUT_DIR"), "/plugins.rs"));

/// The component bytes of the bundled plugin `name`.
pub fn get(name: &str) -> Option<&'static [u8]> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}
