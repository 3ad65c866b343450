//! `lantern`: generate images with LlamaGen-family models and LANTERN speculative decoding,
//! train the small models we ship, and measure them.
mod common;
mod tokenize_cmd;
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
    /// Train one of the models (tokenizer, target, drafter, evaluation classifier).
    #[command(subcommand)]
    Train(train_cmd::TrainCommand),
    /// Encode a dataset into VQ token grids (input of `train gpt`).
    Tokenize(tokenize_cmd::TokenizeArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(cmd) => train_cmd::run(cmd),
        Command::Tokenize(a) => tokenize_cmd::run(a),
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
