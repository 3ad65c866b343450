//! `lantern`: generate images with LlamaGen-family models and LANTERN speculative decoding,
//! train the small models we ship, and measure them.
mod bench_cmd;
mod bench_mode;
mod common;
mod generate_cmd;
mod tokenize_cmd;
mod tools_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

/// Fast autoregressive image generation with LANTERN relaxed speculative decoding.
#[derive(Parser)]
#[command(name = "lantern", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images (class-conditional models) with AR, exact speculative decoding, LANTERN
    /// or LANTERN++.
    Generate(Box<generate_cmd::GenerateArgs>),
    /// Compare decoding modes in one table (tau, latency, speed-up, TVD, accuracy, FID).
    Bench(Box<bench_cmd::BenchArgs>),
    /// Train one of the models (tokenizer, target, drafter, evaluation classifier).
    #[command(subcommand)]
    Train(train_cmd::TrainCommand),
    /// Encode a dataset into VQ token grids (input of `train gpt`).
    Tokenize(tokenize_cmd::TokenizeArgs),
    /// Write teacher-forced target features (drafter training data).
    Distill(tokenize_cmd::DistillArgs),
    /// Show what a checkpoint is: kind, implied config, parameter count, dtype.
    Inspect(tools_cmd::InspectArgs),
    /// Decode token grids (JSON from `generate --save-tokens`) back to PNG images.
    Decode(tools_cmd::DecodeArgs),
    /// Build the latent proximity table of a VQ codebook (or import the official .npy).
    Neighbors(tools_cmd::NeighborsArgs),
    /// Class accuracy and classifier-FID of a folder of generated images.
    Eval(tools_cmd::EvalArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate_cmd::run(*a),
        Command::Bench(a) => bench_cmd::run(*a),
        Command::Train(cmd) => train_cmd::run(cmd),
        Command::Tokenize(a) => tokenize_cmd::run(a),
        Command::Distill(a) => tokenize_cmd::distill(a),
        Command::Inspect(a) => tools_cmd::inspect(a),
        Command::Decode(a) => tools_cmd::decode(a),
        Command::Neighbors(a) => tools_cmd::neighbors(a),
        Command::Eval(a) => tools_cmd::eval(a),
    };
    if let Err(e) = result {
        // One line: the error and its causes, no backtrace.
        let mut msg = e.to_string();
        for cause in e.chain().skip(1) {
            msg.push_str(": ");
            msg.push_str(&cause.to_string());
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
