//! Builds the hostile test plugins for wasm32-wasip2 and embeds them.

use cloister_wasm_build::{PluginCrate, build_and_embed, fail};

const PLUGINS: &[PluginCrate] = &[
    PluginCrate {
        package: "hostile",
        dir: "tests/plugins/hostile",
    },
    PluginCrate {
        package: "hostile-pre",
        dir: "tests/plugins/hostile-pre",
    },
    PluginCrate {
        package: "hostile-select",
        dir: "tests/plugins/hostile-select",
    },
    PluginCrate {
        package: "hostile-net",
        dir: "tests/plugins/hostile-net",
    },
    PluginCrate {
        package: "hostile-fs",
        dir: "tests/plugins/hostile-fs",
    },
    PluginCrate {
        package: "hostile-leak",
        dir: "tests/plugins/hostile-leak",
    },
    PluginCrate {
        package: "hostile-meta",
        dir: "tests/plugins/hostile-meta",
    },
    PluginCrate {
        package: "hostile-fit",
        dir: "tests/plugins/hostile-fit",
    },
];

fn main() {
    if let Err(e) = build_and_embed("../..", PLUGINS, "plugins.rs") {
        fail(&e);
    }
}
