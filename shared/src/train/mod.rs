//! Training: the causal language-modelling loss (more of the training loop lands with the adapters issue).

mod loss;

pub use loss::{causal_lm_loss, IGNORE_INDEX};
