//! The checksum a revision's trailer carries over its manifest files.

use sha2::{Digest, Sha256};

/// Incremental SHA-256 over a revision's files, in the order they are streamed.
///
/// Each file contributes its path, a NUL, its length as 8 bytes big endian, then its bytes,
/// so that moving bytes from one file to the next changes the digest.
#[derive(Default, Clone)]
pub struct ContentDigest {
    hasher: Sha256,
}

impl ContentDigest {
    /// A digest over no files yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one whole file.
    pub fn add_file(&mut self, path: &str, content: &[u8]) {
        self.hasher.update(path.as_bytes());
        self.hasher.update([0u8]);
        self.hasher.update((content.len() as u64).to_be_bytes());
        self.hasher.update(content);
    }

    /// The lowercase hex digest.
    pub fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

/// Lowercase hex SHA-256 of `bytes`: how the server stores tokens.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_bytes_between_files_changes_the_digest() {
        let mut a = ContentDigest::new();
        a.add_file("a.yaml", b"xy");
        a.add_file("b.yaml", b"z");
        let mut b = ContentDigest::new();
        b.add_file("a.yaml", b"x");
        b.add_file("b.yaml", b"yz");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn empty_digest_is_sha256_of_nothing() {
        assert_eq!(
            ContentDigest::new().finish(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
