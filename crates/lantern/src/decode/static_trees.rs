//! Static draft-tree shapes (EAGLE-1 / LANTERN++ `--static_tree`): a fixed list of paths of
//! child ranks, e.g. `[[0], [1], [0, 0]]` = the two best children of the root and the best child
//! of the best one. Presets re-typed from the public EAGLE / LANTERN `choices.py` lists, plus
//! `chain:N` and user JSON, and [`TreeSpec`], which names either a static shape or the EAGLE-2
//! dynamic tree.
use crate::{Error, Result};

/// Largest child rank a static path may use (the drafter proposes the top-10 of each node).
pub const STATIC_TOP_K: usize = 10;
/// Largest number of drafted nodes accepted in a tree (static or dynamic).
pub const MAX_TREE_NODES: usize = 1024;

/// A validated static tree shape. Node 0 is the root; nodes are sorted by depth, then
/// lexicographically by rank path (EAGLE's `generate_tree_buffers` order), so parents precede
/// children and siblings come in rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeShape {
    /// Rank path of every node (`paths[0]` is empty: the root).
    pub paths: Vec<Vec<usize>>,
    /// Parent of every node (`parents[0] = 0`).
    pub parents: Vec<usize>,
    /// Depth of every node (root 0).
    pub depths: Vec<usize>,
}

impl TreeShape {
    /// Builds and validates a shape from rank paths (any order; duplicates are an error).
    pub fn from_paths(paths: &[Vec<usize>]) -> Result<Self> {
        let bad = |msg: String| Error::invalid("static tree", msg);
        if paths.is_empty() {
            return Err(bad("no paths (give at least one, e.g. [[0]])".into()));
        }
        if paths.len() > MAX_TREE_NODES {
            return Err(bad(format!(
                "{} nodes (at most {MAX_TREE_NODES} are supported)",
                paths.len()
            )));
        }
        let mut sorted: Vec<Vec<usize>> = paths.to_vec();
        sorted.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        for w in sorted.windows(2) {
            if w[0] == w[1] {
                return Err(bad(format!(
                    "path {:?} appears twice (remove the duplicate)",
                    w[0]
                )));
            }
        }
        let mut all = vec![Vec::new()];
        all.extend(sorted);
        let index: std::collections::HashMap<&[usize], usize> = all
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_slice(), i))
            .collect();
        let mut parents = vec![0];
        let mut depths = vec![0];
        for p in all.iter().skip(1) {
            if p.is_empty() {
                return Err(bad("empty path [] (the root is implicit; remove it)".into()));
            }
            if let Some(&r) = p.iter().find(|&&r| r >= STATIC_TOP_K) {
                return Err(bad(format!(
                    "path {p:?} uses rank {r} (ranks must be < {STATIC_TOP_K})"
                )));
            }
            let parent = &p[..p.len() - 1];
            let Some(&pi) = index.get(parent) else {
                return Err(bad(format!(
                    "path {p:?} has no parent path {parent:?} (add it to the list)"
                )));
            };
            let last = p[p.len() - 1];
            if last > 0 {
                let mut prev = parent.to_vec();
                prev.push(last - 1);
                if !index.contains_key(prev.as_slice()) {
                    return Err(bad(format!(
                        "path {p:?} has rank {last} but its sibling {prev:?} is missing \
                         (ranks of siblings must be contiguous from 0)"
                    )));
                }
            }
            parents.push(pi);
            depths.push(p.len());
        }
        Ok(Self {
            paths: all,
            parents,
            depths,
        })
    }

    /// Parses a JSON list of rank paths, e.g. `[[0],[1],[0,0]]`.
    pub fn from_json(text: &str) -> Result<Self> {
        let paths: Vec<Vec<usize>> = serde_json::from_str(text).map_err(|e| {
            Error::invalid(
                "static tree JSON",
                format!("{e} (expected a list of rank paths such as [[0],[1],[0,0]])"),
            )
        })?;
        Self::from_paths(&paths)
    }

    /// A single chain of `n` drafts (`[[0], [0,0], ...]`).
    pub fn chain(n: usize) -> Result<Self> {
        if n == 0 || n > MAX_TREE_NODES {
            return Err(Error::invalid(
                "chain length",
                format!("{n} (use 1..={MAX_TREE_NODES})"),
            ));
        }
        let paths: Vec<Vec<usize>> = (1..=n).map(|d| vec![0; d]).collect();
        Self::from_paths(&paths)
    }

    /// A named preset: `naive_extend_57`, `mc_sim_7b_63`, or `chain:N`.
    pub fn preset(name: &str) -> Result<Self> {
        if let Some(n) = name.strip_prefix("chain:") {
            let n: usize = n.parse().map_err(|_| {
                Error::invalid("tree", format!("`{name}` (write chain:N with N a number)"))
            })?;
            return Self::chain(n);
        }
        let paths = match name {
            "naive_extend_57" => naive_extend_57(),
            "mc_sim_7b_63" => mc_sim_7b_63(),
            _ => {
                return Err(Error::invalid(
                    "tree",
                    format!(
                        "unknown preset `{name}` (use naive_extend_57, mc_sim_7b_63, chain:N, \
                         dynamic[:TOTAL:DEPTH:TOPK] or a JSON list of rank paths)"
                    ),
                ))
            }
        };
        Self::from_paths(&paths)
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Always false (a shape holds at least the root).
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Children of `node` in rank order.
    pub fn children(&self, node: usize) -> Vec<usize> {
        (1..self.len())
            .filter(|&i| self.parents[i] == node)
            .collect()
    }

    /// Largest depth of the shape (0: the root alone).
    pub fn max_depth(&self) -> usize {
        self.depths.iter().copied().max().unwrap_or(0)
    }

    /// Number of nodes at each depth, depth 1 first.
    pub fn nodes_per_depth(&self) -> Vec<usize> {
        (1..=self.max_depth())
            .map(|d| self.depths.iter().filter(|&&x| x == d).count())
            .collect()
    }

    /// Number of leaves (the root counts only when it has no children).
    pub fn num_leaves(&self) -> usize {
        (0..self.len())
            .filter(|&i| self.children(i).is_empty())
            .count()
    }
}

/// Expands rank paths written as compact per-parent lists: `(prefix, n)` = children `0..n` of
/// `prefix`.
fn expand(groups: &[(&[usize], usize)]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for (prefix, n) in groups {
        for r in 0..*n {
            let mut p = prefix.to_vec();
            p.push(r);
            out.push(p);
        }
    }
    out
}

/// LANTERN++'s default LlamaGen tree: 57 drafts, nodes per depth 5/13/16/14/9, 33 leaves.
pub fn naive_extend_57() -> Vec<Vec<usize>> {
    expand(&[
        (&[], 5),
        (&[0], 4),
        (&[1], 3),
        (&[2], 3),
        (&[3], 2),
        (&[4], 1),
        (&[0, 0], 4),
        (&[0, 1], 3),
        (&[0, 2], 3),
        (&[0, 3], 2),
        (&[1, 0], 2),
        (&[1, 1], 1),
        (&[2, 0], 1),
        (&[0, 0, 0], 4),
        (&[0, 0, 1], 3),
        (&[0, 0, 2], 2),
        (&[0, 0, 3], 1),
        (&[0, 1, 0], 2),
        (&[0, 1, 1], 1),
        (&[0, 2, 0], 1),
        (&[0, 0, 0, 0], 3),
        (&[0, 0, 0, 1], 2),
        (&[0, 0, 1, 0], 2),
        (&[0, 0, 1, 1], 1),
        (&[0, 0, 2, 0], 1),
    ])
}

/// EAGLE-1's default tree (`mc_sim_7b_63` in EAGLE's `choices.py`; despite the name it holds 25
/// drafts: Medusa's list of the same name is a different, 63-node tree).
pub fn mc_sim_7b_63() -> Vec<Vec<usize>> {
    expand(&[
        (&[], 4),
        (&[0], 3),
        (&[1], 2),
        (&[2], 2),
        (&[3], 1),
        (&[0, 0], 3),
        (&[0, 1], 2),
        (&[0, 2], 2),
        (&[1, 0], 1),
        (&[0, 0, 0], 3),
        (&[0, 0, 0, 0], 2),
    ])
}

/// Parameters of the EAGLE-2 dynamic tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicParams {
    /// Verified tokens per step, root included (LlamaGen default 59).
    pub total_tokens: usize,
    /// Expansion steps after the first level (default 4, i.e. 5 draft levels).
    pub depth: usize,
    /// Children per expanded node and frontier width (default 10).
    pub top_k: usize,
}

impl Default for DynamicParams {
    fn default() -> Self {
        Self {
            total_tokens: 59,
            depth: 4,
            top_k: 10,
        }
    }
}

impl DynamicParams {
    /// Checks the values against the size of the candidate pool.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Error::invalid("dynamic tree", msg);
        if self.top_k == 0 || self.top_k > 64 {
            return Err(bad(format!("top_k {} (use 1..=64)", self.top_k)));
        }
        if self.depth > 32 {
            return Err(bad(format!("depth {} (use 0..=32)", self.depth)));
        }
        let pool = self.top_k + self.depth * self.top_k * self.top_k;
        if self.total_tokens < 2 || self.total_tokens - 1 > pool.min(MAX_TREE_NODES) {
            return Err(bad(format!(
                "total_tokens {} (use 2..={}: root + at most top_k + depth*top_k^2 drafts)",
                self.total_tokens,
                pool.min(MAX_TREE_NODES) + 1
            )));
        }
        Ok(())
    }
}

/// Which draft tree the speculative loop builds each step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TreeSpec {
    /// EAGLE-2's confidence-driven tree, rebuilt every step.
    Dynamic(DynamicParams),
    /// A fixed shape of child ranks (EAGLE-1 / LANTERN++).
    Static(TreeShape),
}

impl Default for TreeSpec {
    fn default() -> Self {
        TreeSpec::Dynamic(DynamicParams::default())
    }
}

impl TreeSpec {
    /// Parses `dynamic`, `dynamic:TOTAL:DEPTH:TOPK`, a static preset (`naive_extend_57`,
    /// `mc_sim_7b_63`, `chain:N`) or a JSON list of rank paths (text starting with `[`).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.starts_with('[') {
            return Ok(TreeSpec::Static(TreeShape::from_json(s)?));
        }
        if s == "dynamic" {
            return Ok(TreeSpec::default());
        }
        if let Some(rest) = s.strip_prefix("dynamic:") {
            let parts: Vec<&str> = rest.split(':').collect();
            let nums: Vec<usize> = parts.iter().filter_map(|p| p.parse().ok()).collect();
            if parts.len() != 3 || nums.len() != 3 {
                return Err(Error::invalid(
                    "tree",
                    format!("`{s}` (write dynamic:TOTAL:DEPTH:TOPK, e.g. dynamic:59:4:10)"),
                ));
            }
            let p = DynamicParams {
                total_tokens: nums[0],
                depth: nums[1],
                top_k: nums[2],
            };
            p.validate()?;
            return Ok(TreeSpec::Dynamic(p));
        }
        Ok(TreeSpec::Static(TreeShape::preset(s)?))
    }

    /// Checks the tree parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            TreeSpec::Dynamic(p) => p.validate(),
            TreeSpec::Static(_) => Ok(()),
        }
    }

    /// Upper bound on the nodes (root included) of one tree.
    pub fn max_nodes(&self) -> usize {
        match self {
            TreeSpec::Dynamic(p) => p.total_tokens,
            TreeSpec::Static(s) => s.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naive_extend_57_counts() {
        let t = TreeShape::preset("naive_extend_57").unwrap();
        assert_eq!(t.len(), 58);
        assert_eq!(t.nodes_per_depth(), vec![5, 13, 16, 14, 9]);
        assert_eq!(t.num_leaves(), 33);
        let non_leaf: Vec<usize> = (1..=4)
            .map(|d| {
                (0..t.len())
                    .filter(|&i| t.depths[i] == d && !t.children(i).is_empty())
                    .count()
            })
            .collect();
        assert_eq!(non_leaf, vec![5, 7, 7, 5]);
    }

    #[test]
    fn mc_sim_and_chain() {
        let t = TreeShape::preset("mc_sim_7b_63").unwrap();
        assert_eq!(t.len(), 26);
        assert_eq!(t.nodes_per_depth(), vec![4, 8, 8, 3, 2]);
        let c = TreeShape::preset("chain:3").unwrap();
        assert_eq!(c.parents, vec![0, 0, 1, 2]);
        assert_eq!(c.depths, vec![0, 1, 2, 3]);
    }

    #[test]
    fn json_order_parents_and_errors() {
        let t = TreeShape::from_json("[[0,0],[1],[0]]").unwrap();
        assert_eq!(t.paths, vec![vec![], vec![0], vec![1], vec![0, 0]]);
        assert_eq!(t.parents, vec![0, 0, 0, 1]);
        for bad in [
            "[[0],[0,1]]",
            "[[1]]",
            "[[0],[0]]",
            "[]",
            "[[0],[10]]",
            "{\"a\":1}",
            "[[0],",
        ] {
            let e = TreeShape::from_json(bad).unwrap_err().to_string();
            assert!(e.contains("static tree"), "{bad}: {e}");
        }
        assert!(TreeShape::from_json("[[0],[0,1]]")
            .unwrap_err()
            .to_string()
            .contains("sibling"));
        assert!(TreeShape::from_json("[[0,0]]")
            .unwrap_err()
            .to_string()
            .contains("parent"));
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(TreeSpec::parse("dynamic").unwrap(), TreeSpec::default());
        let TreeSpec::Dynamic(p) = TreeSpec::parse("dynamic:9:2:3").unwrap() else {
            panic!("not dynamic")
        };
        assert_eq!((p.total_tokens, p.depth, p.top_k), (9, 2, 3));
        assert!(TreeSpec::parse("dynamic:0:4:10").is_err());
        assert!(TreeSpec::parse("dynamic:100000:4:10").is_err());
        assert!(TreeSpec::parse("dynamic:59:4").is_err());
        assert!(TreeSpec::parse("chain:0").is_err());
        assert!(TreeSpec::parse("chain:x").is_err());
        assert!(TreeSpec::parse("nope")
            .unwrap_err()
            .to_string()
            .contains("unknown preset"));
        assert!(matches!(
            TreeSpec::parse("[[0]]").unwrap(),
            TreeSpec::Static(_)
        ));
    }
}
