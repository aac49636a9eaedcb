#![no_main]
//! A safetensors file on arbitrary bytes, read into the tiny test model's slots (CPU backend):
//! an error naming the file, never a panic.

use std::sync::OnceLock;

use phi2_web::weights::assembler::WeightAssembler;
use phi2_web::weights::safetensors::add_safetensors;
use phi2_web::PhiConfig;

fn config() -> PhiConfig {
    static CONFIG: OnceLock<PhiConfig> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let text = include_str!("../../tests/fixtures/phi-tok/config.json");
            PhiConfig::from_json_str(text).expect("the fixture's config")
        })
        .clone()
}

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let mut assembler = WeightAssembler::new(config(), burn::tensor::Device::flex());
    let _ = add_safetensors(&mut assembler, bytes, "model.safetensors");
});
