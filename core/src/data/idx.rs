//! IDX files, the MNIST / Fashion-MNIST format (`train-images-idx3-ubyte[.gz]` + `...-labels-idx1-ubyte[.gz]`):
//! a big-endian header (two zero bytes, a type code, the number of dimensions, each dimension as u32) and
//! then the values. ov3 reads unsigned-byte files (type 0x08) only: images `[N, H, W]` and labels `[N]`.
//!
//! As a data source (`idx:IMAGES,LABELS[,CLASSES]`, DESIGN §6) each image becomes an RGB image and
//! its caption comes from its class name through the source's caption templates.

use std::io::Read;
use std::path::Path;

/// The largest IDX file ov3 reads once decompressed (Fashion-MNIST's training images are 47 MB).
const MAX_BYTES: u64 = 1 << 30;

/// Fashion-MNIST's ten classes in label order (its README), used when no class-name list is given and the
/// file names say fashion-mnist.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];
/// MNIST's classes: the digits.
pub const MNIST_CLASSES: [&str; 10] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];

/// One IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file, gunzipping it when its name ends in `.gz`. Errors name the file and what is wrong.
pub fn read_idx(path: &Path) -> Result<IdxArray, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    let gz = path.extension().is_some_and(|e| e == "gz");
    let read = if gz {
        flate2::read::GzDecoder::new(file).take(MAX_BYTES + 1).read_to_end(&mut bytes)
    } else {
        file.take(MAX_BYTES + 1).read_to_end(&mut bytes)
    };
    read.map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(format!("{}: larger than {} MiB decompressed", path.display(), MAX_BYTES >> 20));
    }
    parse_idx(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses IDX bytes (already decompressed).
pub fn parse_idx(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err("not an IDX file (the magic number's first two bytes must be zero)".into());
    }
    if bytes[2] != 0x08 {
        return Err(format!("IDX value type 0x{:02x} is not unsigned bytes (0x08)", bytes[2]));
    }
    let rank = bytes[3] as usize;
    if rank == 0 || rank > 4 {
        return Err(format!("IDX arrays of {rank} dimensions are not supported (1 to 4)"));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err("truncated IDX header".into());
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("IDX dimensions overflow")?;
    if bytes.len() - header != count {
        return Err(format!(
            "IDX header says {dims:?} = {count} values but the file holds {} (truncated or corrupt)",
            bytes.len() - header
        ));
    }
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
}

/// An IDX image file and its labels, checked against each other.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    pub images: IdxArray,
    pub labels: Vec<u8>,
    pub classes: Vec<String>,
}

impl IdxDataset {
    /// `classes`: one name per label value; `None` takes Fashion-MNIST's or MNIST's names when the file name
    /// says which, and is an error otherwise.
    pub fn open(images: &Path, labels: &Path, classes: Option<Vec<String>>) -> Result<Self, String> {
        let img = read_idx(images)?;
        let lab = read_idx(labels)?;
        if img.dims.len() != 3 {
            return Err(format!("{}: expected images [N, H, W], found dimensions {:?}", images.display(), img.dims));
        }
        if lab.dims.len() != 1 || lab.dims[0] != img.dims[0] {
            return Err(format!(
                "{} holds {:?} labels for {} images in {}",
                labels.display(),
                lab.dims,
                img.dims[0],
                images.display()
            ));
        }
        let classes = match classes {
            Some(c) => c,
            None => {
                let name = images.display().to_string().to_lowercase();
                let known: &[&str] = if name.contains("fashion") {
                    &FASHION_MNIST_CLASSES
                } else if name.contains("mnist") {
                    &MNIST_CLASSES
                } else {
                    return Err(
                        "no class names (the file names do not say MNIST or Fashion-MNIST); give a file with one name per line: idx:IMAGES,LABELS,CLASSES".to_string()
                    );
                };
                known.iter().map(|s| s.to_string()).collect()
            }
        };
        if let Some(&bad) = lab.data.iter().find(|&&l| l as usize >= classes.len()) {
            return Err(format!("{}: label {bad} but only {} class names", labels.display(), classes.len()));
        }
        Ok(Self { images: img, labels: lab.data, classes })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i` as RGB8 (grey replicated) and its class name.
    pub fn get(&self, i: usize) -> (image::RgbImage, &str) {
        let (h, w) = (self.images.dims[1], self.images.dims[2]);
        let grey = &self.images.data[i * h * w..(i + 1) * h * w];
        let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let v = grey[y as usize * w + x as usize];
            image::Rgb([v, v, v])
        });
        (img, &self.classes[self.labels[i] as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_hand_written_header_and_refuses_a_short_file() {
        // 2 images of 2x3: magic 0x00000803, dims 2, 2, 3, then 12 values.
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        bytes.extend(0..12u8);
        let a = parse_idx(&bytes).expect("parses");
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.data[11], 11);
        assert!(parse_idx(&bytes[..bytes.len() - 1]).expect_err("short").contains("truncated"));
        bytes[2] = 0x0D; // float
        assert!(parse_idx(&bytes).expect_err("float").contains("unsigned bytes"));
    }
}
