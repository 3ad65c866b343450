//! Draft trees: the shared representation of a speculative step.
//!
//! Node 0 is the root: the last token already committed (its target row predicts the depth-1
//! drafts). Every other node is a drafted token whose parent precedes it.
use candle_core::Tensor;
use std::sync::OnceLock;

/// How the drafter produced the children of a node, which fixes the acceptance test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftKind {
    /// Top-k of the drafter (EAGLE-2 dynamic tree, greedy static tree): q is a point mass.
    Deterministic,
    /// Children drawn without replacement from the drafter distribution (static tree,
    /// sampling): `q[i]` is the conditional probability of drawing node i after its earlier
    /// siblings.
    WithoutReplacement,
}

/// A drafter distribution kept by a sampled tree: a host row, or a row of a device tensor that
/// is copied to the host the first time acceptance reads it.
#[derive(Debug, Clone)]
pub enum QDist {
    /// The probabilities on the host.
    Host(Vec<f32>),
    /// Row `row` of the probabilities `[n, V]` (any device).
    Device {
        /// The level's probabilities.
        probs: Tensor,
        /// Row of this distribution.
        row: usize,
        /// The row once copied.
        host: OnceLock<Vec<f32>>,
    },
}

impl QDist {
    /// Row `row` of `probs` `[n, V]`, left where it is until read.
    pub fn device(probs: Tensor, row: usize) -> Self {
        Self::Device {
            probs,
            row,
            host: OnceLock::new(),
        }
    }

    /// The probabilities (one device transfer on the first read of a device row).
    pub fn values(&self) -> crate::Result<&[f32]> {
        match self {
            Self::Host(v) => Ok(v),
            Self::Device { probs, row, host } => {
                if host.get().is_none() {
                    // a view's to_vec would move the whole level: one row's transfer
                    let v =
                        super::to_host_f32(&probs.get(*row)?.to_dtype(candle_core::DType::F32)?)?;
                    // a concurrent reader may have set it first: same values
                    let _ = host.set(v);
                }
                Ok(host.get().map(|v| v.as_slice()).unwrap_or(&[]))
            }
        }
    }
}

impl From<Vec<f32>> for QDist {
    fn from(v: Vec<f32>) -> Self {
        Self::Host(v)
    }
}

impl PartialEq for QDist {
    /// Host rows by value; device rows by tensor and row.
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Host(a), Self::Host(b)) => a == b,
            (
                Self::Device {
                    probs: a, row: i, ..
                },
                Self::Device {
                    probs: b, row: j, ..
                },
            ) => a.id() == b.id() && i == j,
            _ => false,
        }
    }
}

/// A tree of drafted tokens verified by one target forward.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftTree {
    /// Token of every node; `tokens[0]` is the root.
    pub tokens: Vec<u32>,
    /// Parent of every node (`parents[0] = 0`, ignored).
    pub parents: Vec<usize>,
    /// Depth of every node (root 0).
    pub depths: Vec<usize>,
    /// Drafter probability of each node as its test needs it: 1.0 for deterministic drafts, the
    /// conditional without-replacement probability otherwise (`q[0]` unused).
    pub q: Vec<f32>,
    /// For `WithoutReplacement` trees: the drafter's full distribution at each node that has
    /// children (the distribution its children were drawn from); `None` elsewhere.
    pub q_dists: Vec<Option<QDist>>,
    /// How the children were drawn.
    pub kind: DraftKind,
}

impl DraftTree {
    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the tree holds only... nothing (never true for a valid tree).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Children of `node`, in sibling order (the order acceptance tries them).
    pub fn children(&self, node: usize) -> Vec<usize> {
        (1..self.len())
            .filter(|&i| self.parents[i] == node)
            .collect()
    }
}

impl DraftTree {
    /// Checks the structural invariants (root first, parents precede children, depths match,
    /// per-node vectors of equal length).
    pub fn validate(&self) -> crate::Result<()> {
        let n = self.len();
        let bad = |msg: String| crate::Error::invalid("draft tree", msg);
        if n == 0 {
            return Err(bad("no nodes (a tree holds at least its root)".into()));
        }
        if self.parents.len() != n || self.depths.len() != n || self.q.len() != n {
            return Err(bad(format!(
                "tokens/parents/depths/q have lengths {}/{}/{}/{} (must be equal)",
                n,
                self.parents.len(),
                self.depths.len(),
                self.q.len()
            )));
        }
        if self.depths[0] != 0 {
            return Err(bad("root depth must be 0".into()));
        }
        for i in 1..n {
            let p = self.parents[i];
            if p >= i {
                return Err(bad(format!(
                    "node {i} has parent {p}, which does not precede it"
                )));
            }
            if self.depths[i] != self.depths[p] + 1 {
                return Err(bad(format!(
                    "node {i} depth {} != parent depth + 1",
                    self.depths[i]
                )));
            }
        }
        Ok(())
    }

    /// Ancestor matrix: `m[i][j]` is true when node `i` may attend to node `j` (j is the root,
    /// an ancestor of i, or i itself).
    pub fn visibility(&self) -> Vec<Vec<bool>> {
        let n = self.len();
        let mut m = vec![vec![false; n]; n];
        for i in 0..n {
            m[i][0] = true;
            m[i][i] = true;
            if i > 0 {
                let p = self.parents[i];
                let parent_row = m[p].clone();
                for (dst, src) in m[i].iter_mut().zip(parent_row) {
                    *dst |= src;
                }
            }
        }
        m
    }

    /// Additive attention mask over the tree block, row-major `n * n` (0 visible, `-inf` not).
    pub fn additive_mask(&self) -> Vec<f32> {
        self.visibility()
            .into_iter()
            .flat_map(|row| {
                row.into_iter()
                    .map(|v| if v { 0.0 } else { f32::NEG_INFINITY })
            })
            .collect()
    }

    /// Rope position of every node: `root_position + depth`.
    pub fn positions(&self, root_position: usize) -> Vec<u32> {
        self.depths
            .iter()
            .map(|&d| (root_position + d) as u32)
            .collect()
    }

    /// Node ids from the root to `node`, both included.
    pub fn path_to(&self, node: usize) -> Vec<usize> {
        let mut path = vec![node];
        let mut cur = node;
        while cur != 0 {
            cur = self.parents[cur];
            path.push(cur);
        }
        path.reverse();
        path
    }

    /// Leaves in node order.
    pub fn leaves(&self) -> Vec<usize> {
        let mut has_child = vec![false; self.len()];
        for &p in self.parents.iter().skip(1) {
            has_child[p] = true;
        }
        (0..self.len()).filter(|&i| !has_child[i]).collect()
    }

    /// Root-to-leaf node paths, one per leaf, in leaf order (EAGLE's `retrieve_indices`
    /// without the `-1` padding).
    pub fn retrieve_paths(&self) -> Vec<Vec<usize>> {
        self.leaves().into_iter().map(|l| self.path_to(l)).collect()
    }

    /// Largest depth in the tree.
    pub fn max_depth(&self) -> usize {
        self.depths.iter().copied().max().unwrap_or(0)
    }

    /// A copy with the nodes reordered by depth (stable, so sibling order is kept), and the
    /// old-to-new index map.
    pub fn sorted_by_depth(&self) -> (DraftTree, Vec<usize>) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by_key(|&i| self.depths[i]);
        let mut new_of = vec![0; self.len()];
        for (new, &old) in order.iter().enumerate() {
            new_of[old] = new;
        }
        let t = DraftTree {
            tokens: order.iter().map(|&i| self.tokens[i]).collect(),
            parents: order.iter().map(|&i| new_of[self.parents[i]]).collect(),
            depths: order.iter().map(|&i| self.depths[i]).collect(),
            q: order.iter().map(|&i| self.q[i]).collect(),
            q_dists: order
                .iter()
                .map(|&i| self.q_dists.get(i).cloned().flatten())
                .collect(),
            kind: self.kind,
        };
        (t, new_of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// root -> a(1), b(2); a -> c(3); c -> d(4)
    fn small() -> DraftTree {
        DraftTree {
            tokens: vec![9, 1, 2, 3, 4],
            parents: vec![0, 0, 0, 1, 3],
            depths: vec![0, 1, 1, 2, 3],
            q: vec![1.0; 5],
            q_dists: vec![None; 5],
            kind: DraftKind::Deterministic,
        }
    }

    #[test]
    fn mask_positions_and_paths_of_a_hand_worked_tree() {
        let t = small();
        t.validate().unwrap();
        let m = t.visibility();
        let expect = [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 1, 0, 1, 1],
        ];
        for i in 0..5 {
            for j in 0..5 {
                assert_eq!(m[i][j], expect[i][j] == 1, "mask[{i}][{j}]");
            }
        }
        assert_eq!(t.positions(10), vec![10, 11, 11, 12, 13]);
        assert_eq!(t.retrieve_paths(), vec![vec![0, 2], vec![0, 1, 3, 4]]);
        assert_eq!(t.children(0), vec![1, 2]);
        let a = t.additive_mask();
        assert_eq!(a[1], f32::NEG_INFINITY);
        assert_eq!(a[5], 0.0);
    }

    #[test]
    fn sort_by_depth_keeps_structure() {
        let mut t = small();
        // reorder: root, a, c, b, d  (depths 0,1,2,1,3)
        t.tokens = vec![9, 1, 3, 2, 4];
        t.parents = vec![0, 0, 1, 0, 2];
        t.depths = vec![0, 1, 2, 1, 3];
        let (s, new_of) = t.sorted_by_depth();
        s.validate().unwrap();
        assert_eq!(s.tokens, vec![9, 1, 2, 3, 4]);
        assert_eq!(s.parents, vec![0, 0, 0, 1, 3]);
        assert_eq!(new_of, vec![0, 1, 3, 2, 4]);
    }

    #[test]
    fn validate_rejects_bad_parents() {
        let mut t = small();
        t.parents[1] = 3;
        assert!(t.validate().is_err());
    }
}
