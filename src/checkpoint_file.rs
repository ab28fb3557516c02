//! The checkpoint file, byte for byte: safetensors whose metadata is written in key
//! order (the same state always gives the same bytes), with a CRC32C of every tensor
//! (its dtype, shape and bytes) and of every metadata field, checked before anything
//! is restored (TensorFlow's checkpoints carry one per tensor too).
//!
//! Two metadata keys hold the digests: `digests`, a JSON object from
//! `"tensor:<name>"` and `"meta:<key>"` to the CRC32C in 8 hex digits, and `digest`, the
//! CRC32C of the `digests` text itself. Files written before digests existed have
//! neither; they are read unverified.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Map, Value};

/// The metadata key of the digest table.
pub(crate) const DIGESTS: &str = "digests";
/// The metadata key of the digest table's own digest.
pub(crate) const DIGEST: &str = "digest";

/// A tensor to write: its name, dtype, shape and little-endian bytes.
pub(crate) struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Why a file was refused.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Not a readable checkpoint (the reason).
    Corrupt(String),
    /// A digest does not match the bytes: what it covers (a tensor or a field).
    Mismatch(String),
}

/// The CRC32C of a tensor: its dtype and shape, then its bytes.
fn tensor_digest(dtype: Dtype, shape: &[usize], bytes: &[u8]) -> u32 {
    let head = format!("{dtype:?}{shape:?}");
    crc32c::crc32c_append(crc32c::crc32c(head.as_bytes()), bytes)
}

/// A digest as the files write it: 8 hex digits.
pub(crate) fn hex(digest: u32) -> String {
    format!("{digest:08x}")
}

/// The file: `tensors` and `metadata` (plus the digests), the metadata first in the
/// header and in key order, the tensors as safetensors orders them (by dtype, then
/// name), so that equal inputs give equal bytes.
pub(crate) fn write(
    tensors: &[Tensor],
    mut metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    let mut digests = BTreeMap::new();
    for t in tensors {
        let d = tensor_digest(t.dtype, &t.shape, &t.bytes);
        digests.insert(format!("tensor:{}", t.name), hex(d));
    }
    for (k, v) in &metadata {
        digests.insert(format!("meta:{k}"), hex(crc32c::crc32c(v.as_bytes())));
    }
    let digests = serde_json::to_string(&digests).map_err(|e| e.to_string())?;
    metadata.insert(DIGEST.into(), hex(crc32c::crc32c(digests.as_bytes())));
    metadata.insert(DIGESTS.into(), digests);
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, String>>()?;
    // safetensors lays out the tensors; its metadata map would come out in hash order,
    // so the header is written again with the metadata in key order
    let laid_out = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
    let n = u64::from_le_bytes(laid_out[..8].try_into().map_err(|_| "short header")?) as usize;
    let tensor_entries: Map<String, Value> =
        serde_json::from_slice(&laid_out[8..8 + n]).map_err(|e| e.to_string())?;
    let mut header = Map::new();
    let metadata: Map<String, Value> = metadata
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    header.insert("__metadata__".into(), Value::Object(metadata));
    header.extend(tensor_entries);
    let mut text = serde_json::to_vec(&Value::Object(header)).map_err(|e| e.to_string())?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let data = &laid_out[8 + n..];
    let mut out = Vec::with_capacity(8 + text.len() + data.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    Ok(out)
}

/// A parsed file: its tensors, its metadata (the digests taken out), and whether it
/// carried digests (all verified) or predates them.
pub(crate) struct Read<'a> {
    pub tensors: SafeTensors<'a>,
    pub metadata: HashMap<String, String>,
    pub verified: bool,
}

/// Parses `bytes` and checks every digest it carries against the bytes they cover.
pub(crate) fn read(bytes: &[u8]) -> Result<Read<'_>, Refusal> {
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| Refusal::Corrupt(e.to_string()))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| Refusal::Corrupt(e.to_string()))?;
    // the header is compact JSON padded with spaces: anything else in the padding is
    // a changed byte that JSON would ignore
    let n = u64::from_le_bytes(
        bytes[..8]
            .try_into()
            .map_err(|_| Refusal::Corrupt("short".into()))?,
    );
    let text = &bytes[8..8 + n as usize];
    let end = text.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    if text[..end].last() != Some(&b'}') {
        return Err(Refusal::Corrupt(
            "the header's padding is not spaces".into(),
        ));
    }
    let mut metadata = header
        .metadata()
        .clone()
        .ok_or_else(|| Refusal::Corrupt("no metadata".into()))?;
    let (table, digest) = (metadata.remove(DIGESTS), metadata.remove(DIGEST));
    let (table, digest) = match (table, digest) {
        (None, None) => {
            return Ok(Read {
                tensors,
                metadata,
                verified: false,
            })
        }
        (Some(t), Some(d)) => (t, d),
        _ => return Err(Refusal::Corrupt("the digest table is incomplete".into())),
    };
    if hex(crc32c::crc32c(table.as_bytes())) != digest {
        return Err(Refusal::Mismatch("the digest table".into()));
    }
    let table: BTreeMap<String, String> =
        serde_json::from_str(&table).map_err(|e| Refusal::Corrupt(format!("digests: {e}")))?;
    let expect = |key: String, actual: u32, what: String| match table.get(&key) {
        Some(d) if *d == hex(actual) => Ok(()),
        Some(_) => Err(Refusal::Mismatch(what)),
        None => Err(Refusal::Corrupt(format!("{what} has no digest"))),
    };
    for (k, v) in &metadata {
        expect(
            format!("meta:{k}"),
            crc32c::crc32c(v.as_bytes()),
            format!("metadata `{k}`"),
        )?;
    }
    for (name, view) in tensors.tensors() {
        let d = tensor_digest(view.dtype(), view.shape(), view.data());
        expect(format!("tensor:{name}"), d, format!("tensor `{name}`"))?;
    }
    if table.len() != metadata.len() + tensors.names().len() {
        return Err(Refusal::Corrupt(
            "the digest table lists fields or tensors the file does not have".into(),
        ));
    }
    Ok(Read {
        tensors,
        metadata,
        verified: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<Tensor>, BTreeMap<String, String>) {
        let tensors = vec![
            Tensor {
                name: "b".into(),
                dtype: Dtype::F32,
                shape: vec![2],
                bytes: [1.5f32, -2.0]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            },
            Tensor {
                name: "a".into(),
                dtype: Dtype::U8,
                shape: vec![3],
                bytes: vec![7, 8, 9],
            },
        ];
        let metadata = (0..20)
            .map(|i| (format!("key{i}"), format!("value {i}")))
            .collect();
        (tensors, metadata)
    }

    #[test]
    fn written_files_read_back_verified_and_standard() {
        let (tensors, metadata) = sample();
        let bytes = write(&tensors, metadata.clone()).unwrap();
        let r = read(&bytes).unwrap();
        assert!(r.verified);
        assert_eq!(r.metadata.len(), metadata.len());
        assert_eq!(r.tensors.tensor("b").unwrap().data(), tensors[0].bytes);
        // the header's metadata in key order, and a plain safetensors file
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let keys: Vec<usize> = ["digest\"", "digests\"", "key0\"", "key1\"", "key10\""]
            .iter()
            .map(|k| header.find(k).unwrap())
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{header}");
        assert_eq!(n % 8, 0);
    }

    #[test]
    fn equal_inputs_give_equal_bytes() {
        let (tensors, metadata) = sample();
        let reversed: BTreeMap<String, String> = metadata.clone().into_iter().rev().collect();
        assert_eq!(
            write(&tensors, metadata).unwrap(),
            write(&tensors, reversed).unwrap()
        );
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let (tensors, metadata) = sample();
        let bytes = write(&tensors, metadata).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut m = bytes.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            assert!(
                read(&m).is_err(),
                "bit {bit} of {} accepted",
                bytes.len() * 8
            );
        }
    }

    /// `tensors` and `metadata` as safetensors writes them, with no digests.
    fn plain(tensors: &[Tensor], metadata: BTreeMap<String, String>) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|t| {
                let v = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
                (t.name.clone(), v)
            })
            .collect();
        safetensors::serialize(views, Some(metadata.into_iter().collect())).unwrap()
    }

    #[test]
    fn files_without_digests_read_unverified() {
        let (tensors, mut metadata) = sample();
        let r = plain(&tensors, metadata.clone());
        assert!(!read(&r).unwrap().verified);
        // half a digest table is not a file without digests
        metadata.insert(DIGEST.into(), "00000000".into());
        let half = plain(&tensors, metadata);
        assert!(matches!(read(&half), Err(Refusal::Corrupt(_))));
    }
}
