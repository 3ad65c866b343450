//! Evaluation of generated images for class-conditional models: a small CNN classifier trained
//! on the real data, class accuracy of generated images, and FID computed on the classifier's
//! penultimate features ("classifier-FID", `method.md` §7).
pub mod classifier;
pub mod fid;

pub use classifier::{train_classifier, Classifier, ClassifierConfig, ClassifierTrainConfig};
pub use fid::{fid, FeatureStats};
