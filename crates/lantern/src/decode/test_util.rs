//! Test helpers shared by the tree builders' unit tests.
use super::draft::Expand;
use super::level::{DraftLevel, HostLevel};
use crate::Result;

/// What one expand call received.
pub(crate) type Fed = (Vec<Vec<u32>>, Vec<Vec<Option<usize>>>);

/// Drafter whose distribution after a node depends only on the node's token: after token t the
/// probabilities are `table[t]`. Records what every call was fed.
pub(crate) struct Table {
    pub table: Vec<Vec<f32>>,
    pub fed: Vec<Fed>,
}

impl Expand for Table {
    fn expand(
        &mut self,
        tokens: &candle_core::Tensor,
        parents: &[Vec<Option<usize>>],
    ) -> Result<Box<dyn DraftLevel>> {
        let tokens: Vec<Vec<u32>> = tokens.to_vec2()?;
        self.fed.push((tokens.clone(), parents.to_vec()));
        Ok(Box::new(HostLevel::new(
            tokens
                .iter()
                .map(|ts| ts.iter().map(|&t| self.table[t as usize].clone()).collect())
                .collect(),
        )))
    }
}
