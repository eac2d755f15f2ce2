//! Bounds-checked little-endian reading over a byte slice, shared by the file parsers; every read that would run
//! past the end is an error, never a panic.

/// A cursor over untrusted bytes.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Takes the next `n` bytes.
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated at byte {} while reading {what} ({n} bytes wanted, {} left)",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    /// A count read from the file, refused when `count · min_item_bytes` cannot fit in what is left.
    pub(crate) fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, String> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item_bytes.max(1)))
            .is_some_and(|b| b <= self.remaining());
        if !fits {
            return Err(format!(
                "{what} is {n}, more than the {} bytes left could hold",
                self.remaining()
            ));
        }
        Ok(n as usize)
    }
}

/// Decodes little-endian f32 bytes.
pub(crate) fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Decodes little-endian IEEE half bytes.
pub(crate) fn f16s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// Decodes little-endian bfloat16 bytes.
pub(crate) fn bf16s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_reads_are_errors() {
        let mut c = Cursor::new(&[1, 0, 0]);
        assert!(c.u32("magic").unwrap_err().contains("magic"));
        let mut c = Cursor::new(&[0xff; 8]);
        assert!(c.count(1, "tensor count").is_err());
    }
}
