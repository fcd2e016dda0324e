//! The RFC 6962 Merkle tree hash (MTH) over audit entries.
//!
//! Leaf hash `SHA-256(0x00 ‖ entry)`, interior node `SHA-256(0x01 ‖ left ‖
//! right)`; for `n > 1` leaves the left subtree holds the largest power of two
//! smaller than `n`. The empty tree hashes to `SHA-256("")`.

use ring::digest::{Context, SHA256, digest};

/// A 32-byte SHA-256 hash.
pub type Hash = [u8; 32];

fn finish(ctx: Context) -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `SHA-256(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x00]);
    ctx.update(data);
    finish(ctx)
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    finish(ctx)
}

/// The hash of the empty tree.
pub fn empty_root() -> Hash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, b"").as_ref());
    out
}

/// Largest power of two strictly smaller than `n` (`n ≥ 2`).
fn split_point(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// MTH over the given leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split_point(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path (RFC 6962 §2.1.1 `PATH(m, D[n])`) of leaf `index`.
/// `None` if `index` is out of range.
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut path = Vec::new();
    build_path(leaves, index, &mut path);
    Some(path)
}

fn build_path(leaves: &[Hash], m: usize, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split_point(n);
    if m < k {
        build_path(&leaves[..k], m, out);
        out.push(root(&leaves[k..]));
    } else {
        build_path(&leaves[k..], m - k, out);
        out.push(root(&leaves[..k]));
    }
}

/// Checks an inclusion proof (the algorithm of RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// The right edge of a growing tree: the roots of its perfect subtrees,
/// largest first. Appending is O(log n) and so is the root, which lets the
/// audit log keep its tree head current without rereading old entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (height, hash) of each perfect subtree, left to right.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.nodes.last() {
            if h != node.0 {
                break;
            }
            self.nodes.pop();
            node = (h + 1, node_hash(&left, &node.1));
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// MTH of the leaves so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.nodes.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return empty_root();
        };
        for (_, left) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }

    /// Serialized form: size (u64 BE) then each (height u32 BE, hash).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.nodes.len() * 36);
        out.extend_from_slice(&self.size.to_be_bytes());
        for (h, hash) in &self.nodes {
            out.extend_from_slice(&h.to_be_bytes());
            out.extend_from_slice(hash);
        }
        out
    }

    /// Parses [`Frontier::to_bytes`]; `None` if malformed or inconsistent.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let size = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let rest = &bytes[8..];
        if !rest.len().is_multiple_of(36) {
            return None;
        }
        let mut nodes = Vec::new();
        let mut total = 0u64;
        for chunk in rest.chunks_exact(36) {
            let h = u32::from_be_bytes(chunk[..4].try_into().ok()?);
            let hash: Hash = chunk[4..].try_into().ok()?;
            if h >= 64 {
                return None;
            }
            total = total.checked_add(1u64 << h)?;
            nodes.push((h, hash));
        }
        let heights_descend = nodes.windows(2).all(|w| w[0].0 > w[1].0);
        (total == size && heights_descend).then_some(Self { size, nodes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn rfc6962_shape_for_three_leaves() {
        let l = leaves(3);
        assert_eq!(root(&l), node_hash(&node_hash(&l[0], &l[1]), &l[2]));
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // The leaf hash of the empty string, a published RFC 6962 test vector.
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn frontier_root_equals_recursive_root_and_survives_serialization() {
        let all = leaves(70);
        let mut f = Frontier::new();
        assert_eq!(f.root(), empty_root());
        for (i, leaf) in all.iter().enumerate() {
            f.push(*leaf);
            assert_eq!(f.root(), root(&all[..=i]), "size {}", i + 1);
            assert_eq!(Frontier::from_bytes(&f.to_bytes()), Some(f.clone()));
        }
        assert_eq!(Frontier::from_bytes(&[0, 1, 2]), None);
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_wrong_one_does_not() {
        for n in 1..=33 {
            let all = leaves(n);
            let r = root(&all);
            for i in 0..n {
                let proof = inclusion_proof(&all, i).expect("in range");
                assert!(
                    verify_inclusion(i as u64, n as u64, &all[i], &proof, &r),
                    "{i}/{n}"
                );
                let other = leaf_hash(b"forged");
                assert!(!verify_inclusion(i as u64, n as u64, &other, &proof, &r));
                if n > 1 {
                    assert!(
                        !verify_inclusion(((i + 1) % n) as u64, n as u64, &all[i], &proof, &r)
                            || all[i] == all[(i + 1) % n]
                    );
                }
            }
            assert!(inclusion_proof(&all, n).is_none());
        }
    }
}
