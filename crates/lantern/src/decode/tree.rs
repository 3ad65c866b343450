//! Draft trees: the shared representation of a speculative step.
//!
//! Node 0 is the root: the last token already committed (its target row predicts the depth-1
//! drafts). Every other node is a drafted token whose parent precedes it.

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
    pub q_dists: Vec<Option<Vec<f32>>>,
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
