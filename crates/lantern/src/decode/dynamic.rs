//! EAGLE-2's dynamic draft tree (`topK_genrate`), for every image of a batch.
//!
//! Level 1 = the top-k drafts after the root, scored by their log-probabilities. Then `depth`
//! times: feed the k frontier nodes, take the top-k children of each, score them by cumulative
//! log-probability, keep the best k of the k*k as the next frontier. Finally the
//! `total_tokens - 1` best of all scored candidates form the tree (ordered by score, then by
//! creation order, so every selected node's parent, which scores at least as high and was
//! created earlier, is selected too), sorted back into creation order.
use super::draft::{token_tensor, Expand};
use super::level::{DraftLevel, Want};
use super::static_trees::DynamicParams;
use super::tree::{DraftKind, DraftTree};
use crate::Result;

/// A scored candidate node of a dynamic tree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cand {
    pub token: u32,
    /// Cumulative log-probability.
    pub score: f32,
    /// Candidate index of the parent (`None` = root).
    pub parent: Option<usize>,
}

/// A candidate's log-probability term (`-inf` for a probability of 0).
pub(crate) fn ln(p: f32) -> f32 {
    if p > 0.0 {
        p.ln()
    } else {
        f32::NEG_INFINITY
    }
}

/// Builds one EAGLE-2 tree per image. Row 0 of image g in `root` is the drafter distribution
/// after image g's root token `root_tokens[g]`; `expand` runs the drafter on each frontier.
/// Each level asks its [`DraftLevel`] once for the top-k of every frontier node.
pub fn draft_dynamic(
    params: &DynamicParams,
    root_tokens: &[u32],
    mut root: Box<dyn DraftLevel>,
    expand: &mut dyn Expand,
) -> Result<Vec<DraftTree>> {
    params.validate()?;
    let n_img = root_tokens.len();
    let k = params.top_k.min(root.vocab().max(1));
    let mut cands: Vec<Vec<Cand>> = vec![Vec::new(); n_img];
    // candidate index of each frontier node, per image
    let mut frontier: Vec<Vec<usize>> = vec![Vec::new(); n_img];
    let want: Vec<Want> = (0..n_img).map(|g| Want { g, row: 0, k }).collect();
    for (w, picks) in want.iter().zip(root.top_k(&want)?) {
        for (x, p) in picks {
            cands[w.g].push(Cand {
                token: x as u32,
                score: ln(p),
                parent: None,
            });
            frontier[w.g].push(cands[w.g].len() - 1);
        }
    }
    // candidate index -> index among fed nodes
    let mut fed_of: Vec<std::collections::HashMap<usize, usize>> = vec![Default::default(); n_img];
    let mut n_fed = 0;
    for _ in 0..params.depth {
        let mut tokens = vec![Vec::with_capacity(k); n_img];
        let mut parents = vec![Vec::with_capacity(k); n_img];
        for g in 0..n_img {
            for (i, &c) in frontier[g].iter().enumerate() {
                let cand = cands[g][c];
                tokens[g].push(cand.token);
                parents[g].push(cand.parent.and_then(|p| fed_of[g].get(&p).copied()));
                fed_of[g].insert(c, n_fed + i);
            }
        }
        n_fed += k;
        let mut level = expand.expand(&token_tensor(&tokens)?, &parents)?;
        let want: Vec<Want> = (0..n_img)
            .flat_map(|g| (0..frontier[g].len()).map(move |row| Want { g, row, k }))
            .collect();
        let mut picks = level.top_k(&want)?.into_iter();
        for g in 0..n_img {
            let mut level: Vec<usize> = Vec::with_capacity(k * k);
            for &f in &frontier[g] {
                let base = cands[g][f].score;
                for (x, p) in picks.next().unwrap_or_default() {
                    cands[g].push(Cand {
                        token: x as u32,
                        score: base + ln(p),
                        parent: Some(f),
                    });
                    level.push(cands[g].len() - 1);
                }
            }
            level.sort_by(|&a, &b| {
                cands[g][b]
                    .score
                    .total_cmp(&cands[g][a].score)
                    .then(a.cmp(&b))
            });
            level.truncate(k);
            level.sort_unstable();
            frontier[g] = level;
        }
    }
    (0..n_img)
        .map(|g| assemble(&cands[g], root_tokens[g], params.total_tokens))
        .collect()
}

/// The tree of the `total_tokens - 1` best candidates `c` (see [`select_columns`]), in
/// creation order after the root.
pub(crate) fn assemble(c: &[Cand], root: u32, total_tokens: usize) -> Result<DraftTree> {
    let (order, parents) = select_columns(c, total_tokens);
    let tokens: Vec<u32> = std::iter::once(root)
        .chain(order.iter().map(|&ci| c[ci].token))
        .collect();
    tree_of_columns(&tokens, &parents)
}

/// The verification columns of the `cols - 1` best candidates `c` (by score, then creation
/// order, so that every selected node's parent, which scores at least as high and was created
/// earlier, is selected too) in creation order: the candidate of every column after the root,
/// and the parent column of every column (the root's 0; `None` where a parent was not
/// selected, which scores that break the order above can cause).
pub(crate) fn select_columns(c: &[Cand], cols: usize) -> (Vec<usize>, Vec<Option<usize>>) {
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| c[b].score.total_cmp(&c[a].score).then(a.cmp(&b)));
    order.truncate(cols.saturating_sub(1));
    order.sort_unstable();
    let mut col_of = std::collections::HashMap::new();
    let mut parents = vec![Some(0)];
    for (i, &ci) in order.iter().enumerate() {
        parents.push(match c[ci].parent {
            None => Some(0),
            Some(p) => col_of.get(&p).copied(),
        });
        col_of.insert(ci, i + 1);
    }
    (order, parents)
}

/// The deterministic draft tree of verification columns: column i holds `tokens[i]` under
/// column `parents[i]` (column 0 is the root); an error where a parent is missing or not an
/// earlier column.
pub(crate) fn tree_of_columns(tokens: &[u32], parents: &[Option<usize>]) -> Result<DraftTree> {
    let mut t = DraftTree {
        tokens: vec![*tokens.first().unwrap_or(&0)],
        parents: vec![0],
        depths: vec![0],
        q: vec![1.0],
        q_dists: vec![None],
        kind: DraftKind::Deterministic,
    };
    for (i, (&tok, &parent)) in tokens.iter().zip(parents).enumerate().skip(1) {
        let parent = parent.filter(|&p| p < i).ok_or_else(|| {
            crate::Error::invalid("dynamic tree", "selected node without its parent")
        })?;
        t.tokens.push(tok);
        t.parents.push(parent);
        t.depths.push(t.depths[parent] + 1);
        t.q.push(1.0);
        t.q_dists.push(None);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::decode::level::HostLevel;
    use crate::decode::test_util::Table;

    #[test]
    fn hand_worked_dynamic_tree() {
        // vocab 3; after any token: [0.6, 0.3, 0.1]
        let row = vec![0.6, 0.3, 0.1];
        let mut d = Table {
            table: vec![row.clone(); 3],
            fed: vec![],
        };
        let p = DynamicParams {
            total_tokens: 5,
            depth: 1,
            top_k: 2,
        };
        let root = Box::new(HostLevel::roots(vec![row]));
        let trees = draft_dynamic(&p, &[7], root, &mut d).unwrap();
        let t = &trees[0];
        // candidates: L1 tokens 0 (ln .6), 1 (ln .3); expansion: 0->0 (.36), 0->1 (.18),
        // 1->0 (.18), 1->1 (.09). Best 4: 0(.6), 0->0(.36), 1(.3), then .18 tie -> 0->1 first.
        assert_eq!(t.tokens, vec![7, 0, 1, 0, 1]);
        assert_eq!(t.parents, vec![0, 0, 0, 1, 1]);
        assert_eq!(t.depths, vec![0, 1, 1, 2, 2]);
        t.validate().unwrap();
        assert_eq!(d.fed.len(), 1);
        assert_eq!(d.fed[0].0, vec![vec![0, 1]]);
        assert_eq!(d.fed[0].1, vec![vec![None, None]]);
    }

    #[test]
    fn frontier_parents_index_fed_nodes() {
        let row = vec![0.5, 0.3, 0.2];
        let mut d = Table {
            table: vec![row.clone(); 3],
            fed: vec![],
        };
        let p = DynamicParams {
            total_tokens: 8,
            depth: 2,
            top_k: 2,
        };
        let root = Box::new(HostLevel::roots(vec![row.clone(), row]));
        let trees = draft_dynamic(&p, &[1, 2], root, &mut d).unwrap();
        assert_eq!(trees.len(), 2);
        assert_eq!(trees[0].len(), 8);
        // second call: frontier = 0->0 (.25) and 0->1 (.15) (ties .15 with 1->0: creation order)
        assert_eq!(d.fed[1].0[0], vec![0, 1]);
        assert_eq!(d.fed[1].1[0], vec![Some(0), Some(0)]);
        for t in &trees {
            t.validate().unwrap();
        }
    }
}
