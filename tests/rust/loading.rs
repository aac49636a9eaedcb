//! Bad model directories give errors that name the file, field or tensor — never a panic.

mod common;

use std::path::Path;

use common::{fixture, Scratch};
use phi2_web::kernels::KernelOptions;
use phi2_web::loading::load_dir;
use phi2_web::{block_on, BackendKind, Error};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn load_error(dir: &Path) -> Error {
    let device = block_on(BackendKind::Cpu.device()).unwrap();
    match load_dir(dir, &device, KernelOptions::default()) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e,
    }
}

/// A scratch copy of the phi-80 fixture whose tensors `edit` may change.
fn edited_phi80(
    test: &str,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
) -> Scratch {
    let source = fixture("phi-80");
    let dir = Scratch::new(test);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let out = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
    dir
}

#[test]
fn missing_directory_is_named() {
    let err = load_error(Path::new("/nonexistent/phi2-model"));
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/phi2-model"), "{err}");
}

#[test]
fn malformed_config_is_named() {
    let dir = edited_phi80("badconfig", |_| {});
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 160,").unwrap();
    let err = load_error(&dir);
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn unsupported_config_names_the_field() {
    match load_error(&fixture("phi-qkln")) {
        Error::Config { field, .. } => assert_eq!(field, "qk_layernorm"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn misshaped_tensor_names_tensor_and_both_shapes() {
    let dir = edited_phi80("misshaped", |tensors| {
        let t = tensors
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.mlp.fc1.bias")
            .unwrap();
        t.2 = vec![320];
        t.3.truncate(320 * 4);
    });
    let err = load_error(&dir);
    let text = err.to_string();
    assert!(matches!(err, Error::TensorShape { .. }), "{err:?}");
    assert!(text.contains("model.layers.1.mlp.fc1.bias"), "{text}");
    assert!(text.contains("[640]") && text.contains("[320]"), "{text}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = edited_phi80("missing", |tensors| {
        tensors.retain(|t| t.0 != "lm_head.bias")
    });
    match load_error(&dir) {
        Error::MissingTensor { name } => assert_eq!(name, "lm_head.bias"),
        other => panic!("expected a missing tensor, got {other:?}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = edited_phi80("unexpected", |tensors| {
        tensors.push((
            "model.layers.0.mlp.fc3.weight".into(),
            Dtype::F32,
            vec![1],
            vec![0; 4],
        ));
    });
    match load_error(&dir) {
        Error::UnexpectedTensor { name, .. } => assert_eq!(name, "model.layers.0.mlp.fc3.weight"),
        other => panic!("expected an unexpected tensor, got {other:?}"),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let dir = edited_phi80("dtype", |tensors| {
        let t = tensors.iter_mut().find(|t| t.0 == "lm_head.bias").unwrap();
        t.1 = Dtype::I32;
    });
    let text = load_error(&dir).to_string();
    assert!(
        text.contains("lm_head.bias") && text.contains("I32"),
        "{text}"
    );
}

#[test]
fn missing_shard_is_named() {
    let dir = Scratch::new("shard");
    std::fs::create_dir_all(&dir).unwrap();
    let source = fixture("phi-tok");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let index = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    let shard = phi2_web::weights::safetensors::shard_files(&index)
        .unwrap()
        .pop()
        .unwrap();
    std::fs::remove_file(dir.join(&shard)).unwrap();
    let text = load_error(&dir).to_string();
    assert!(
        text.contains(&shard) && text.contains("not found"),
        "{text}"
    );
}

#[test]
fn truncated_safetensors_is_a_format_error() {
    let dir = edited_phi80("truncated", |_| {});
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}
