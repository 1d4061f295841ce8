//! Tenant scope of a registry: adapter names are chosen by each team, so in a registry that many
//! namespaces share, team A's `support-bot` and team B's must not be the same adapter (B's
//! publish would become A's `latest`). By default each namespace gets its own registry below the
//! shared root, `<root>/namespaces/<namespace>/adapters/<name>/v<N>`: under a prefix of its own,
//! so that no namespace's name (`adapters`, `checkpoints`) can land on the paths the root itself
//! uses for shared adapters and for trainer checkpoints. The operator hands that root to the
//! trainer (where to publish) and to the server (where references resolve), and resolves in it
//! itself, so all three agree and a reference from one namespace cannot reach another's adapters.
//! `Shared` keeps the root as it is, for a registry that is one team's, or whose names are
//! coordinated across namespaces, and for adapters published before scoping existed.

use std::fmt;
use std::str::FromStr;

use crate::error::Result;
use crate::names::validate_label;

/// How a registry root is divided between namespaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RegistryScope {
    /// Each namespace has its own registry at `<root>/namespaces/<namespace>`.
    #[default]
    Namespace,
    /// Every namespace uses the root itself, and shares its adapter names.
    Shared,
}

impl FromStr for RegistryScope {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "namespace" => Ok(Self::Namespace),
            "shared" => Ok(Self::Shared),
            other => Err(format!("registry scope {other:?}: expected namespace or shared")),
        }
    }
}

impl fmt::Display for RegistryScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Namespace => "namespace",
            Self::Shared => "shared",
        })
    }
}

/// Where below a shared root the namespaces' registries are.
pub const NAMESPACES_PREFIX: &str = "namespaces";

/// The registry root the objects of `namespace` publish to and resolve in. The namespace must be
/// a DNS-1123 label (as Kubernetes namespaces are): it becomes one path segment, so it can never
/// climb out of the shared root or name a deeper prefix.
pub fn scoped_registry_uri(root: &str, namespace: &str, scope: RegistryScope) -> Result<String> {
    match scope {
        RegistryScope::Shared => Ok(root.to_string()),
        RegistryScope::Namespace => {
            validate_label("namespace", namespace)?;
            Ok(format!(
                "{}/{NAMESPACES_PREFIX}/{namespace}",
                root.trim_end_matches('/')
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_namespace_gets_its_own_registry_below_the_root_by_default() {
        assert_eq!(RegistryScope::default(), RegistryScope::Namespace);
        for root in ["s3://kubetune/registry", "s3://kubetune/registry/"] {
            assert_eq!(
                scoped_registry_uri(root, "team-a", RegistryScope::Namespace).unwrap(),
                "s3://kubetune/registry/namespaces/team-a"
            );
        }
        assert_eq!(
            scoped_registry_uri("file:///srv/reg", "team-b", RegistryScope::Namespace).unwrap(),
            "file:///srv/reg/namespaces/team-b"
        );
    }

    #[test]
    fn a_shared_registry_keeps_its_root_for_every_namespace() {
        for ns in ["team-a", "team-b"] {
            assert_eq!(
                scoped_registry_uri("s3://kubetune/registry", ns, RegistryScope::Shared).unwrap(),
                "s3://kubetune/registry"
            );
        }
    }

    #[test]
    fn a_namespace_that_is_not_one_path_segment_is_refused_naming_it() {
        for bad in ["", "..", "team-a/adapters", "Team-A", "team_a", "-a"] {
            let err = scoped_registry_uri("s3://kubetune/registry", bad, RegistryScope::Namespace)
                .expect_err(bad)
                .to_string();
            assert!(err.contains("namespace"), "{bad}: {err}");
        }
    }

    #[test]
    fn scopes_parse_from_and_print_as_their_flag_values() {
        for scope in [RegistryScope::Namespace, RegistryScope::Shared] {
            assert_eq!(scope.to_string().parse::<RegistryScope>(), Ok(scope));
        }
        let err = "tenant".parse::<RegistryScope>().unwrap_err();
        assert!(err.contains("expected namespace or shared"), "{err}");
    }
}
