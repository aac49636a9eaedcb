#![no_main]
//! The bundle manifest reader on arbitrary bytes: an error or a manifest, never a panic.

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = phi2_web::weights::bundle::parse_manifest(bytes, "manifest.json");
});
