//! Builds the example plugins for wasm32-wasip2 and embeds them.

use cloister_wasm_build::{PluginCrate, build_and_embed, fail};

const PLUGINS: &[PluginCrate] = &[
    PluginCrate {
        package: "text-normalize",
        dir: "plugins/text-normalize",
    },
    PluginCrate {
        package: "hashed-ngrams",
        dir: "plugins/hashed-ngrams",
    },
    PluginCrate {
        package: "standardize",
        dir: "plugins/standardize",
    },
    PluginCrate {
        package: "dual-agree",
        dir: "plugins/dual-agree",
    },
    PluginCrate {
        package: "least-confidence",
        dir: "plugins/least-confidence",
    },
    PluginCrate {
        package: "entropy",
        dir: "plugins/entropy",
    },
    PluginCrate {
        package: "tfidf",
        dir: "plugins/tfidf",
    },
];

fn main() {
    if let Err(e) = build_and_embed("../..", PLUGINS, "plugins.rs") {
        fail(&e);
    }
}
