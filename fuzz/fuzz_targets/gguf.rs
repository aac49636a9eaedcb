#![no_main]
//! The GGUF reader on arbitrary bytes: an error or tensors that lie inside the file.

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    if let Ok(gguf) = phi2_web::weights::gguf::Gguf::parse(bytes, "model.gguf") {
        for tensor in &gguf.tensors {
            assert!(tensor.start + tensor.len <= bytes.len());
        }
        let _ = gguf.phi_config();
    }
});
