//! Datasets: import, catalog, statistics, record views and labels.

use std::path::Path;

use serde::Serialize;

use crate::datasets::{self, DatasetVersion, LabelEntry, Provenance, SplitCounts, StoredRecord};
use crate::digest::Digest;
use crate::policy::{Action, Resource};
use crate::users::User;

use super::{Cloister, ServiceError};

/// Options of a dataset import.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportOptions {
    /// `jsonl` or `csv`; by extension when `None`.
    pub format: Option<String>,
    /// Field mapping.
    #[serde(skip)]
    pub schema: crate::records::Schema,
}

impl Cloister {
    /// Imports a file as the next version of dataset `name`.
    pub fn import_dataset(
        &self,
        who: &User,
        name: &str,
        file: &Path,
        options: &ImportOptions,
    ) -> Result<DatasetVersion, ServiceError> {
        datasets::check_name(name)?;
        let params = (
            name,
            file.file_name().map(|f| f.to_string_lossy().into_owned()),
            options,
            &options.schema.id_field,
            &options.schema.label_field,
        );
        self.guard(
            &who.principal(),
            Action::ImportDataset,
            &Resource::Dataset { name: name.into() },
            &params,
        )?;
        let mut source =
            datasets::open_source(file, options.format.as_deref(), options.schema.clone())?;
        Ok(datasets::import(
            &self.env,
            name,
            source.as_mut(),
            &options.schema.id_field,
            &who.name,
        )?)
    }

    /// Lists every version of every dataset.
    pub fn list_datasets(&self, who: &User) -> Result<Vec<DatasetVersion>, ServiceError> {
        self.guard(
            &who.principal(),
            Action::ListDatasets,
            &Resource::Environment,
            &(),
        )?;
        Ok(datasets::list(&self.env, &self.manifests)?)
    }

    /// [`Cloister::list_datasets`] for async callers (the console's most
    /// frequent read): the audit wait holds no thread, and the listing
    /// itself reads a few manifests from the store's cache.
    pub async fn list_datasets_async(
        &self,
        who: &User,
    ) -> Result<Vec<DatasetVersion>, ServiceError> {
        self.guard_async(
            &who.principal(),
            Action::ListDatasets,
            &Resource::Environment,
            &(),
        )
        .await?;
        Ok(datasets::list(&self.env, &self.manifests)?)
    }

    /// Statistics of `NAME[@VERSION]`; with a seed, also split counts.
    pub fn dataset_stats(
        &self,
        who: &User,
        reference: &str,
        seed: Option<u64>,
    ) -> Result<(DatasetVersion, Option<SplitCounts>), ServiceError> {
        let name = reference.split('@').next().unwrap_or(reference);
        self.guard(
            &who.principal(),
            Action::ViewStats,
            &Resource::Dataset { name: name.into() },
            &(reference, seed),
        )?;
        let v = datasets::resolve(&self.env, reference)?;
        let splits = match seed {
            Some(s) => Some(datasets::split_counts(&self.env, &v, s)?),
            None => None,
        };
        Ok((v, splits))
    }

    /// Dataset export. Forbidden by policy for everyone; and were that policy
    /// removed, there is still no code that writes rows out.
    pub fn export_dataset(&self, who: &User, reference: &str) -> Result<(), ServiceError> {
        let name = reference.split('@').next().unwrap_or(reference);
        self.guard(
            &who.principal(),
            Action::ExportDataset,
            &Resource::Dataset { name: name.into() },
            &reference,
        )?;
        Err(ServiceError::NoSuchOperation(
            "datasets cannot be exported: raw data never leaves the environment",
        ))
    }

    /// A record as the policies see it, for `action` by `who`. An unknown
    /// dataset is decided on a stand-in first (see [`Cloister::found`]), so
    /// a caller refused the record learns nothing about which datasets
    /// exist.
    pub(crate) fn record_resource(
        &self,
        who: &User,
        action: Action,
        reference: &str,
        id: &str,
    ) -> Result<(DatasetVersion, Resource), ServiceError> {
        self.found(
            self.lookup_record(reference, id),
            who,
            action,
            || Resource::Record {
                dataset: reference.split('@').next().unwrap_or(reference).into(),
                id: id.into(),
                assignee: None,
            },
            &(reference, id),
        )
    }

    /// A record as the policies see it, looked up without authorizing:
    /// for records the caller already reached through an authorized path
    /// (their queue) and for `policy explain`.
    pub(crate) fn lookup_record(
        &self,
        reference: &str,
        id: &str,
    ) -> Result<(DatasetVersion, Resource), ServiceError> {
        let v = datasets::resolve(&self.env, reference)?;
        let assignee = datasets::assignee(&self.env, &v, id)?;
        Ok((
            v.clone(),
            Resource::Record {
                dataset: v.name.clone(),
                id: id.to_string(),
                assignee,
            },
        ))
    }

    /// Shows one record: only to the labeler it is assigned to.
    pub fn view_record(
        &self,
        who: &User,
        reference: &str,
        id: &str,
    ) -> Result<StoredRecord, ServiceError> {
        let (v, resource) = self.record_resource(who, Action::ViewRecord, reference, id)?;
        self.guard(
            &who.principal(),
            Action::ViewRecord,
            &resource,
            &(reference, id),
        )?;
        Ok(datasets::get_record(&self.env, &v, id)?)
    }

    /// Stores a human label for an assigned record.
    pub fn label_record(
        &self,
        who: &User,
        reference: &str,
        id: &str,
        label: &str,
    ) -> Result<(), ServiceError> {
        let entry = human_label(who, label)?;
        let (v, resource) = self.record_resource(who, Action::LabelRecord, reference, id)?;
        self.guard(
            &who.principal(),
            Action::LabelRecord,
            &resource,
            &(reference, id, Digest::of(label.as_bytes()).to_hex()),
        )?;
        let batch = datasets::set_label(&self.env, &v, id, &entry)?;
        self.env.store().commit(batch)?;
        Ok(())
    }
}

/// A person's label, checked: the one rule for every label a person gives
/// (`label set`, the labeling queue, label files).
pub(super) fn human_label(who: &User, label: &str) -> Result<LabelEntry, ServiceError> {
    if label.is_empty() || label.len() > 256 || label.chars().any(char::is_control) {
        return Err(ServiceError::BadRequest(
            "a label is 1 to 256 bytes without control characters".into(),
        ));
    }
    Ok(LabelEntry {
        label: label.into(),
        provenance: Provenance::Human {
            user: who.name.clone(),
        },
        time_ms: crate::time::now_ms(),
    })
}
