//! Loading a model from a directory or a URL, from either kind of model directory: a phi2-web
//! bundle (`manifest.json` + chunks, fed to a [`BundleLoader`] in order) or a Hugging Face
//! checkpoint (`config.json`, `tokenizer.json`, safetensors shards). Files come from any
//! [`FileSource`]; each tensor goes to the device as soon as it is read.

use burn::tensor::Device;

use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::kernels::{KernelOptions, KernelPlan};
use crate::model::Phi;
use crate::tokenizer::PhiTokenizer;
use crate::weights::assembler::{HostTensor, WeightAssembler};
use crate::weights::bundle::{self, parse_manifest};
use crate::weights::names::{self, Target};
use crate::weights::safetensors::{add_safetensors, shard_files};

/// Where a model's files come from. `read` returns `None` for a file that does not exist.
#[allow(async_fn_in_trait)] // used only with concrete sources, never as `dyn`
pub trait FileSource {
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// The file's full path or URL, for messages.
    fn locate(&self, name: &str) -> String;
}

async fn read_required<S: FileSource>(source: &S, name: &str) -> Result<Vec<u8>> {
    source
        .read(name)
        .await?
        .ok_or_else(|| Error::io(source.locate(name), "not found"))
}

fn utf8<'a>(bytes: &'a [u8], source: &impl FileSource, name: &str) -> Result<&'a str> {
    std::str::from_utf8(bytes)
        .map_err(|e| Error::format(source.locate(name), format!("not UTF-8: {e}")))
}

/// Loads a model directory of either kind, its kernels as `options` say.
pub async fn load_model<S: FileSource>(
    source: &S,
    device: &Device,
    options: KernelOptions,
) -> Result<(Phi, PhiTokenizer)> {
    match source.read(bundle::MANIFEST).await? {
        Some(manifest) => load_bundle(source, &manifest, device, options).await,
        None => load_hf(source, device, options).await,
    }
}

/// A bundle being loaded, fed its chunks in order by whoever fetches them (the directory
/// reader below, the package's fetcher in the browser). Each chunk is checked against its
/// sha256 before anything else happens, so a rejected chunk can be fetched again and pushed
/// once more; each tensor goes to the device as soon as its bytes are complete.
pub struct BundleLoader {
    stream: bundle::ChunkStream,
    assembler: WeightAssembler,
    device: Device,
    options: KernelOptions,
}

impl BundleLoader {
    /// Fails when `options` ask for kernels the device cannot run.
    pub fn new(
        manifest: bundle::Manifest,
        device: &Device,
        options: KernelOptions,
    ) -> Result<Self> {
        KernelPlan::for_device(device, options)?;
        Ok(BundleLoader {
            assembler: WeightAssembler::new(manifest.config.clone(), device.clone()),
            stream: bundle::ChunkStream::new(manifest),
            device: device.clone(),
            options,
        })
    }

    pub fn manifest(&self) -> &bundle::Manifest {
        self.stream.manifest()
    }

    /// Verifies chunk `index` (`digest`: see [`bundle::verify_chunk`]) and uploads the tensors
    /// it completes; `location` names it.
    pub fn push(
        &mut self,
        index: usize,
        bytes: &[u8],
        digest: Option<&str>,
        location: &str,
    ) -> Result<()> {
        let config = self.stream.manifest().config.clone();
        let assembler = &mut self.assembler;
        self.stream
            .push(index, bytes, digest, location, |entry, words| {
                let slot = match names::target(&entry.name, &config) {
                    Some(Target::One(slot)) => slot,
                    _ => unreachable!("Manifest::parse checked every name"),
                };
                match bundle::decode(entry, words) {
                    bundle::TensorBytes::Q4(matrix) => assembler.insert_q4(slot, matrix, location),
                    bundle::TensorBytes::F32(values) => assembler.insert(
                        slot,
                        HostTensor {
                            shape: entry.shape.clone(),
                            data: values,
                        },
                        location,
                    ),
                }
            })
    }

    /// The model, once every chunk has been pushed.
    pub fn finish(self) -> Result<Phi> {
        if !self.stream.is_complete() {
            let manifest = self.stream.manifest();
            let next = self.stream.next_chunk();
            return Err(Error::State(format!(
                "the bundle is incomplete: chunk {next} ({}) of {} has not been loaded",
                manifest.chunks.get(next).map_or("?", |c| c.file.as_str()),
                manifest.chunks.len()
            )));
        }
        Phi::from_weights(self.assembler.finish()?, &self.device, self.options)
    }
}

async fn load_bundle<S: FileSource>(
    source: &S,
    manifest_bytes: &[u8],
    device: &Device,
    options: KernelOptions,
) -> Result<(Phi, PhiTokenizer)> {
    let manifest = parse_manifest(manifest_bytes, &source.locate(bundle::MANIFEST))?;
    let tokenizer = PhiTokenizer::from_bytes(
        &read_required(source, &manifest.tokenizer).await?,
        &source.locate(&manifest.tokenizer),
    )?;
    let mut loader = BundleLoader::new(manifest, device, options)?;
    for index in 0..loader.manifest().chunks.len() {
        let file = loader.manifest().chunks[index].file.clone();
        let bytes = read_required(source, &file).await?;
        loader.push(index, &bytes, None, &source.locate(&file))?;
    }
    Ok((loader.finish()?, tokenizer))
}

/// Loads an HF-layout model: `config.json`, `tokenizer.json`, and `model.safetensors` or
/// `model.safetensors.index.json` with its shards. Shards are read and uploaded one at a time.
async fn load_hf<S: FileSource>(
    source: &S,
    device: &Device,
    options: KernelOptions,
) -> Result<(Phi, PhiTokenizer)> {
    // A choice the device cannot run fails before anything is read.
    KernelPlan::for_device(device, options)?;
    let config_bytes = read_required(source, "config.json").await?;
    let config = PhiConfig::from_json_str(utf8(&config_bytes, source, "config.json")?).map_err(
        |e| match e {
            Error::Format { message, .. } => Error::format(source.locate("config.json"), message),
            other => other,
        },
    )?;
    let tokenizer_bytes = read_required(source, "tokenizer.json").await?;
    let tokenizer = PhiTokenizer::from_bytes(&tokenizer_bytes, &source.locate("tokenizer.json"))?;

    let shards = match source.read("model.safetensors.index.json").await? {
        Some(index) => shard_files(utf8(&index, source, "model.safetensors.index.json")?)?,
        None => vec!["model.safetensors".to_string()],
    };
    let mut assembler = WeightAssembler::new(config, device.clone());
    for shard in &shards {
        let bytes = read_required(source, shard).await?;
        add_safetensors(&mut assembler, &bytes, &source.locate(shard))?;
    }
    let weights = assembler.finish()?;
    Ok((Phi::from_weights(weights, device, options)?, tokenizer))
}

/// A model directory on the local disk.
#[cfg(not(target_arch = "wasm32"))]
pub struct DirSource(pub std::path::PathBuf);

#[cfg(not(target_arch = "wasm32"))]
impl FileSource for DirSource {
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.0.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path.display().to_string(), e)),
        }
    }

    fn locate(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

/// Loads a model directory from disk (native only), its kernels as `options` say.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_dir(
    dir: &std::path::Path,
    device: &Device,
    options: KernelOptions,
) -> Result<(Phi, PhiTokenizer)> {
    if !dir.is_dir() {
        return Err(Error::io(dir.display().to_string(), "is not a directory"));
    }
    crate::block_on(load_model(&DirSource(dir.to_path_buf()), device, options))
}
