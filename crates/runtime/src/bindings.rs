//! The one place that runs `bindgen!`: one module per plugin world, all three
//! sharing the host's own types for `cloister:plugin/types` (see
//! [`cloister_types::types`]). Nothing generated here is public.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::sandbox::HostState;
use cloister_types::types::{
    DataRecord, Decision, Metadata, PluginError, PluginKind, PredictionSet, SparseBatch, Vocabulary,
};

/// `cloister:plugin/types` as bindgen sees it: the host's own types, plus the
/// (empty) host-side surface bindgen expects of an imported interface. The
/// interface has no functions, so there is nothing to implement.
#[allow(dead_code)]
pub mod types_iface {
    pub use cloister_types::types::*;

    pub trait HostWithStore<T>: wasmtime::component::HasData {}
    impl<H: ?Sized, T> HostWithStore<T> for H where H: wasmtime::component::HasData {}

    pub trait Host {}
    impl<T: Host + ?Sized> Host for &mut T {}

    pub fn add_to_linker<T, D>(
        linker: &mut wasmtime::component::Linker<T>,
        _host_getter: fn(&mut T) -> D::Data<'_>,
    ) -> wasmtime::Result<()>
    where
        D: HostWithStore<T>,
        for<'a> D::Data<'a>: Host,
        T: 'static,
    {
        linker.instance("cloister:plugin/types@0.1.0")?;
        Ok(())
    }
}

mod preprocessor {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "preprocessor",
        with: { "cloister:plugin/types": crate::bindings::types_iface },
    });
}

mod featurizer {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "featurizer",
        with: { "cloister:plugin/types": crate::bindings::types_iface },
    });
}

mod fitted_featurizer {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "fitted-featurizer",
        with: { "cloister:plugin/types": crate::bindings::types_iface },
    });
}

mod selector {
    wasmtime::component::bindgen!({
        path: "../../plugin-sdk/wit",
        world: "selector",
        with: { "cloister:plugin/types": crate::bindings::types_iface },
    });
}

const PLUGIN_IFACE: &str = "cloister:plugin/plugin@0.1";
const FIT_IFACE: &str = "cloister:plugin/fit@0.1";
const KIND_IFACES: [(&str, PluginKind); 3] = [
    ("cloister:plugin/preprocess@0.1", PluginKind::Preprocessor),
    ("cloister:plugin/featurize@0.1", PluginKind::Featurizer),
    ("cloister:plugin/select@0.1", PluginKind::Selector),
];

/// The kind whose world the exports implement: the common `plugin`
/// interface plus exactly one kind interface (any 0.1.x version); and
/// whether it is a fitted featurizer (a featurizer that also exports
/// `fit`). `fit` beside any other kind is no world.
pub(crate) fn exported_kind(exports: &[String]) -> Option<(PluginKind, bool)> {
    let has = |prefix: &str| exports.iter().any(|e| e.starts_with(&format!("{prefix}.")));
    if !has(PLUGIN_IFACE) {
        return None;
    }
    let kinds: Vec<PluginKind> = KIND_IFACES
        .iter()
        .filter(|(iface, _)| has(iface))
        .map(|&(_, k)| k)
        .collect();
    let fitted = has(FIT_IFACE);
    match kinds.as_slice() {
        [PluginKind::Featurizer] => Some((PluginKind::Featurizer, fitted)),
        [k] if !fitted => Some((*k, false)),
        _ => None,
    }
}

/// A type-checked, pre-linked component of a known kind.
pub(crate) enum Pre {
    Preprocessor(preprocessor::PreprocessorPre<HostState>),
    Featurizer(featurizer::FeaturizerPre<HostState>),
    FittedFeaturizer(fitted_featurizer::FittedFeaturizerPre<HostState>),
    Selector(selector::SelectorPre<HostState>),
}

impl Pre {
    pub(crate) fn new(
        (kind, fitted): (PluginKind, bool),
        pre: InstancePre<HostState>,
    ) -> wasmtime::Result<Pre> {
        Ok(match kind {
            PluginKind::Preprocessor => Pre::Preprocessor(preprocessor::PreprocessorPre::new(pre)?),
            PluginKind::Featurizer if fitted => {
                Pre::FittedFeaturizer(fitted_featurizer::FittedFeaturizerPre::new(pre)?)
            }
            PluginKind::Featurizer => Pre::Featurizer(featurizer::FeaturizerPre::new(pre)?),
            PluginKind::Selector => Pre::Selector(selector::SelectorPre::new(pre)?),
        })
    }

    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            Pre::Preprocessor(p) => Bindings::Preprocessor(p.instantiate(store)?),
            Pre::Featurizer(p) => Bindings::Featurizer(p.instantiate(store)?),
            Pre::FittedFeaturizer(p) => Bindings::FittedFeaturizer(p.instantiate(store)?),
            Pre::Selector(p) => Bindings::Selector(p.instantiate(store)?),
        })
    }
}

/// An instantiated plugin's exports.
pub(crate) enum Bindings {
    Preprocessor(preprocessor::Preprocessor),
    Featurizer(featurizer::Featurizer),
    FittedFeaturizer(fitted_featurizer::FittedFeaturizer),
    Selector(selector::Selector),
}

type CallResult<T> = wasmtime::Result<Result<T, PluginError>>;

fn wrong_kind<T>() -> CallResult<T> {
    Err(wasmtime::format_err!(
        "plugin kind does not export this function"
    ))
}

impl Bindings {
    pub(crate) fn describe(&self, store: &mut Store<HostState>) -> wasmtime::Result<Metadata> {
        match self {
            Bindings::Preprocessor(b) => b.cloister_plugin_plugin().call_describe(store),
            Bindings::Featurizer(b) => b.cloister_plugin_plugin().call_describe(store),
            Bindings::FittedFeaturizer(b) => b.cloister_plugin_plugin().call_describe(store),
            Bindings::Selector(b) => b.cloister_plugin_plugin().call_describe(store),
        }
    }

    pub(crate) fn configure(
        &self,
        store: &mut Store<HostState>,
        config: &[(String, String)],
    ) -> CallResult<()> {
        match self {
            Bindings::Preprocessor(b) => b.cloister_plugin_plugin().call_configure(store, config),
            Bindings::Featurizer(b) => b.cloister_plugin_plugin().call_configure(store, config),
            Bindings::FittedFeaturizer(b) => {
                b.cloister_plugin_plugin().call_configure(store, config)
            }
            Bindings::Selector(b) => b.cloister_plugin_plugin().call_configure(store, config),
        }
    }

    pub(crate) fn dimension(&self, store: &mut Store<HostState>) -> wasmtime::Result<u32> {
        match self {
            Bindings::Featurizer(b) => b.cloister_plugin_featurize().call_dimension(store),
            Bindings::FittedFeaturizer(b) => b.cloister_plugin_featurize().call_dimension(store),
            _ => Err(wasmtime::format_err!("not a featurizer")),
        }
    }

    pub(crate) fn process(
        &self,
        store: &mut Store<HostState>,
        batch: &[DataRecord],
    ) -> CallResult<Vec<DataRecord>> {
        match self {
            Bindings::Preprocessor(b) => b.cloister_plugin_preprocess().call_process(store, batch),
            _ => wrong_kind(),
        }
    }

    pub(crate) fn featurize(
        &self,
        store: &mut Store<HostState>,
        batch: &[DataRecord],
    ) -> CallResult<SparseBatch> {
        match self {
            Bindings::Featurizer(b) => b.cloister_plugin_featurize().call_featurize(store, batch),
            Bindings::FittedFeaturizer(b) => {
                b.cloister_plugin_featurize().call_featurize(store, batch)
            }
            _ => wrong_kind(),
        }
    }

    pub(crate) fn terms(
        &self,
        store: &mut Store<HostState>,
        record: &DataRecord,
    ) -> CallResult<Vec<u64>> {
        match self {
            Bindings::FittedFeaturizer(b) => b.cloister_plugin_fit().call_terms(store, record),
            _ => wrong_kind(),
        }
    }

    pub(crate) fn load(
        &self,
        store: &mut Store<HostState>,
        vocabulary: &Vocabulary,
    ) -> CallResult<()> {
        match self {
            Bindings::FittedFeaturizer(b) => b.cloister_plugin_fit().call_load(store, vocabulary),
            _ => wrong_kind(),
        }
    }

    pub(crate) fn select(
        &self,
        store: &mut Store<HostState>,
        classes: &[String],
        batch: &[PredictionSet],
    ) -> CallResult<Vec<Decision>> {
        match self {
            Bindings::Selector(b) => b
                .cloister_plugin_select()
                .call_select(store, classes, batch),
            _ => wrong_kind(),
        }
    }
}
