//! What the operator may do with a tenant's storage Secret when it reads storage itself
//! (a ModelDeployment's registry, a FineTuneJob's config.json).
//!
//! A Secret is written by whoever owns the namespace, and the operator runs with more rights
//! than they have: a Secret that picked the endpoint, a token file or a metadata service would
//! let a tenant send the operator's requests, or the contents of its files, wherever it likes.
//! So the operator takes only the keys that authenticate to the store, and an endpoint only
//! when the platform team listed it (`--allowed-storage-endpoints`). The tenant's own pods
//! (trainer, server) still get the whole Secret: what they do is the tenant's business.

use kubetune_storage::Credentials;
use std::collections::BTreeMap;

/// Keys that carry credentials or settings of the store the URI names, and nothing the
/// operator would act on beyond that store.
const CREDENTIAL_KEYS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_KEY",
];

/// Keys that point the store client at another host; used only with an allowed value.
const ENDPOINT_KEYS: &[&str] = &[
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AZURE_STORAGE_ENDPOINT",
    "AZURE_ENDPOINT",
];

/// Whether the API server refused the operator a read (403): with the chart's
/// `rbac.secretNamespaces` set, Secrets are readable only in the namespaces it lists.
pub fn is_forbidden(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(response) if response.code == 403)
}

/// What a FineTuneJob or ModelDeployment whose Secret the operator may not read says, naming
/// `field` and what grants the read.
pub fn secret_forbidden(field: &str, ns: &str, name: &str) -> String {
    format!(
        "{field}: the operator may not read Secret {ns}/{name}; add namespace {ns} to the chart's rbac.secretNamespaces"
    )
}

/// An endpoint as compared with the allow-list: no trailing slash, scheme and host lowercase.
fn normalize(endpoint: &str) -> String {
    endpoint.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// The credentials the operator may use for `uri` from a tenant's Secret `secret` (its data as
/// `vars`); `Err` is a message naming the field and the setting that was refused.
pub fn tenant_credentials(
    uri: &str,
    uri_field: &str,
    secret: Option<&str>,
    vars: BTreeMap<String, String>,
    allowed: &[String],
) -> Result<Credentials, String> {
    let entries: Vec<&str> = allowed.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).collect();
    let listed = if entries.is_empty() {
        "none; the chart value registry.allowedEndpoints lists them".to_string()
    } else {
        entries.join(", ")
    };
    let allowed: Vec<String> = entries.iter().map(|e| normalize(e)).collect();
    // The operator's own files are not the tenant's to read.
    if uri.starts_with("file://") && !allowed.contains(&normalize("file://")) {
        return Err(format!(
            "{uri_field}: {uri} is on the operator's file system, which it reads for no tenant (allowed storage endpoints: {listed})"
        ));
    }
    let mut kept = BTreeMap::new();
    for (key, value) in vars {
        if ENDPOINT_KEYS.contains(&key.as_str()) {
            if !allowed.contains(&normalize(&value)) {
                let field = secret.map_or("spec.storageSecretRef.name".to_string(), |s| {
                    format!("spec.storageSecretRef.name: Secret {s}")
                });
                return Err(format!(
                    "{field} sets {key} to {value}, which is not one of the operator's allowed storage endpoints ({listed})"
                ));
            }
            // Plain HTTP is the listed endpoint's scheme, the platform's choice and not the
            // tenant's: the store client refuses http:// unless told it may.
            if normalize(&value).starts_with("http://") {
                let prefix = key.split('_').next().unwrap_or("AWS");
                kept.insert(format!("{prefix}_ALLOW_HTTP"), "true".to_string());
            }
            kept.insert(key, value);
        } else if CREDENTIAL_KEYS.contains(&key.as_str()) {
            kept.insert(key, value);
        } else {
            // Token files, metadata and authority hosts, emulators: never on a tenant's word.
            tracing::debug!(key, "storage Secret key not used by the operator");
        }
    }
    Ok(Credentials::from_vars(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn minio() -> Vec<String> {
        vec!["http://minio.storage.svc:9000/".to_string()]
    }

    #[test]
    fn an_endpoint_the_platform_listed_is_used_and_one_it_did_not_is_refused_naming_the_key() {
        let ok = vars(&[
            ("AWS_ENDPOINT_URL", "HTTP://minio.storage.svc:9000"),
            ("AWS_ACCESS_KEY_ID", "k"),
        ]);
        let creds = tenant_credentials("s3://b/r", "spec.registry", Some("team-a/s3"), ok, &minio()).expect("allowed");
        assert_eq!(creds.get("AWS_ENDPOINT_URL"), Some("HTTP://minio.storage.svc:9000"));
        assert_eq!(creds.get("AWS_ACCESS_KEY_ID"), Some("k"));
        assert_eq!(
            creds.get("AWS_ALLOW_HTTP"),
            Some("true"),
            "the listed endpoint is plain HTTP"
        );
        let evil = vars(&[("AWS_ENDPOINT_URL", "http://10.0.0.1:80")]);
        let err = tenant_credentials("s3://b/r", "spec.registry", Some("team-a/s3"), evil, &minio()).unwrap_err();
        assert!(
            err.starts_with("spec.storageSecretRef.name: Secret team-a/s3 sets AWS_ENDPOINT_URL to http://10.0.0.1:80"),
            "{err}"
        );
        assert!(err.contains("(http://minio.storage.svc:9000/)"), "{err}");
    }

    #[test]
    fn with_no_endpoint_listed_only_the_providers_own_endpoints_are_reached() {
        let plain = vars(&[("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")]);
        assert!(tenant_credentials("s3://b/r", "spec.registry", Some("a/s"), plain, &[]).is_ok());
        let custom = vars(&[("AZURE_STORAGE_ENDPOINT", "https://x.example.com")]);
        let err = tenant_credentials("az://c/r", "spec.registry", Some("a/s"), custom, &[]).unwrap_err();
        assert!(
            err.contains("AZURE_STORAGE_ENDPOINT") && err.contains("registry.allowedEndpoints"),
            "{err}"
        );
    }

    #[test]
    fn keys_that_would_make_the_operator_read_files_or_call_other_hosts_are_dropped() {
        let sneaky = vars(&[
            ("AWS_ACCESS_KEY_ID", "k"),
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
            ("AWS_METADATA_ENDPOINT", "http://10.0.0.1"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/kubernetes.io/serviceaccount/token",
            ),
            ("AZURE_AUTHORITY_HOST", "http://10.0.0.1"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/etc/passwd"),
            ("AWS_ALLOW_HTTP", "true"),
        ]);
        let creds = tenant_credentials("s3://b/r", "spec.registry", None, sneaky, &[]).expect("dropped, not refused");
        assert_eq!(creds.get("AWS_ACCESS_KEY_ID"), Some("k"));
        for key in [
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_METADATA_ENDPOINT",
            "AZURE_FEDERATED_TOKEN_FILE",
            "AZURE_AUTHORITY_HOST",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "AWS_ALLOW_HTTP",
        ] {
            assert_eq!(creds.get(key), None, "{key}");
        }
    }

    #[test]
    fn a_file_uri_is_read_for_a_tenant_only_when_file_is_listed() {
        let err = tenant_credentials("file:///etc", "spec.baseModel.uri", None, BTreeMap::new(), &[]).unwrap_err();
        assert!(err.starts_with("spec.baseModel.uri: file:///etc"), "{err}");
        let listed = vec!["file://".to_string()];
        assert!(tenant_credentials(
            "file:///srv/models",
            "spec.baseModel.uri",
            None,
            BTreeMap::new(),
            &listed
        )
        .is_ok());
    }
}
