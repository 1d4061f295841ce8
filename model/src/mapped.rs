//! safetensors files read through memory mappings whose pages are released as soon as each
//! tensor has been copied out.
//!
//! candle's mmap-backed VarBuilder keeps every page it touched mapped until the builder is
//! dropped, and mapped file pages count in the process's RSS. Loading a QLoRA base therefore
//! peaked at the whole file's size plus the 4-bit copy (181 MiB for the benchmark model, whose
//! training then needed less). Here each tensor's pages are handed back (MADV_DONTNEED; the
//! kernel's page cache keeps them, so nothing is read twice) once the tensor is copied, and the
//! load holds at most one tensor's pages at a time.

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::Path;

/// Where one tensor lies: its file, and its bytes' range within the file.
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

pub(crate) struct MappedSafetensors {
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

impl MappedSafetensors {
    /// Maps and indexes `files`; a tensor name found in two files is an error.
    ///
    /// # Safety
    /// As for every mmap-based loader, nobody may rewrite the files while they are loaded.
    pub(crate) unsafe fn open(files: &[impl AsRef<Path>]) -> candle_core::Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut entries = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let path = path.as_ref();
            let file =
                std::fs::File::open(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
            // SAFETY: read-only mapping; the caller promises the file is not rewritten.
            let map =
                unsafe { Mmap::map(&file) }.map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
            let st = safetensors::SafeTensors::deserialize(&map)
                .map_err(|e| candle_core::Error::Msg(format!("{}: not a safetensors file: {e}", path.display())))?;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
                let entry = Entry {
                    file: i,
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    range: start..start + view.data().len(),
                };
                if entries.insert(name.clone(), entry).is_some() {
                    return Err(candle_core::Error::Msg(format!(
                        "tensor {name} is stored in more than one file"
                    )));
                }
            }
            maps.push(map);
        }
        Ok(Self { maps, entries })
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        let map = &self.maps[entry.file];
        let bytes = &map[entry.range.clone()];
        let view = safetensors::tensor::TensorView::new(entry.dtype, entry.shape.clone(), bytes)
            .map_err(|e| candle_core::Error::Msg(format!("tensor {name}: {e}")))?;
        let tensor = view.load(device)?.to_dtype(dtype)?;
        release(map, entry.range.clone());
        Ok(tensor)
    }
}

/// Drops the process's mapping of the whole pages within `range` of `map`. Pages shared with a
/// neighbouring tensor stay; they go with that tensor.
fn release(map: &Mmap, range: std::ops::Range<usize>) {
    const PAGE: usize = 4096;
    let start = range.start.next_multiple_of(PAGE);
    let end = range.end / PAGE * PAGE;
    if end > start {
        // SAFETY: the mapping is private and read-only, so dropping its pages loses nothing: a
        // later read faults them in again from the file. A failure only leaves them mapped.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    }
}

impl candle_nn::var_builder::SimpleBackend for MappedSafetensors {
    fn get(&self, s: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}
