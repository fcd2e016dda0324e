//! Signed checkpoints: an Ed25519 signature over (origin, size, root, time).

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::AuditError;
use super::merkle::Hash;

const HEADER: &str = "cloister-audit-checkpoint v1";

/// The keys the audit log signs and authenticates with.
#[derive(Debug)]
pub struct AuditKeys {
    signing: Ed25519KeyPair,
    mac: ring::hmac::Key,
}

impl AuditKeys {
    /// Builds the keys from a PKCS#8 Ed25519 document and a MAC secret.
    pub fn new(pkcs8: &[u8], mac_secret: &[u8]) -> Result<Self, AuditError> {
        let signing = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| {
            AuditError::Keys("the audit signing key is not a valid Ed25519 PKCS#8 key".into())
        })?;
        if mac_secret.len() < 32 {
            return Err(AuditError::Keys(
                "the audit MAC secret is shorter than 32 bytes".into(),
            ));
        }
        Ok(Self {
            signing,
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, mac_secret),
        })
    }

    /// The public half of the signing key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.signing.public_key().as_ref());
        out
    }

    pub(crate) fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::hmac::sign(&self.mac, data).as_ref());
        out
    }

    pub(crate) fn mac_ok(&self, data: &[u8], tag: &[u8]) -> bool {
        ring::hmac::verify(&self.mac, data, tag).is_ok()
    }

    /// Signs arbitrary bytes with the environment's Ed25519 key (model
    /// bundles). Callers must put a domain string in `message` so that no
    /// signature can be mistaken for a checkpoint's.
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.signing.sign(message).as_ref().to_vec()
    }

    /// Signs a checkpoint for the given tree state.
    pub fn sign(&self, origin: &str, size: u64, root: Hash, time_ms: u64) -> Checkpoint {
        let mut cp = Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            time_ms,
            key: self.public_key(),
            signature: Vec::new(),
        };
        cp.signature = self
            .signing
            .sign(cp.signed_message().as_bytes())
            .as_ref()
            .to_vec();
        cp
    }
}

/// A signed statement "the log `origin` had `size` entries with Merkle root
/// `root` at `time`". Its text form is stable and meant to be stored outside
/// the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The environment id.
    pub origin: String,
    /// Number of entries covered.
    pub size: u64,
    /// RFC 6962 Merkle root of those entries.
    pub root: Hash,
    /// Signing time, ms since the epoch.
    pub time_ms: u64,
    /// The Ed25519 public key that signed.
    pub key: [u8; 32],
    /// The signature over [`Checkpoint::signed_message`].
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The exact bytes that are signed.
    pub fn signed_message(&self) -> String {
        format!(
            "{HEADER}\norigin {}\nsize {}\nroot {}\ntime {}\n",
            self.origin,
            self.size,
            hex::encode(self.root),
            crate::time::rfc3339(self.time_ms)
        )
    }

    /// The text form: the signed message, then the key and signature lines.
    pub fn to_text(&self) -> String {
        format!(
            "{}key {}\nsignature {}\n",
            self.signed_message(),
            hex::encode(self.key),
            hex::encode(&self.signature)
        )
    }

    /// Parses [`Checkpoint::to_text`]. Errors name the offending line.
    pub fn parse(text: &str) -> Result<Self, AuditError> {
        let bad =
            |line: usize, what: &str| AuditError::BadCheckpoint(format!("line {line}: {what}"));
        let lines: Vec<&str> = text.lines().collect();
        if lines.first() != Some(&HEADER) {
            return Err(bad(1, &format!("expected `{HEADER}`")));
        }
        let field = |i: usize, name: &str| -> Result<&str, AuditError> {
            lines
                .get(i)
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .ok_or_else(|| bad(i + 1, &format!("expected `{name} …`")))
        };
        let hex32 = |i: usize, name: &str| -> Result<[u8; 32], AuditError> {
            let v = hex::decode(field(i, name)?)
                .map_err(|_| bad(i + 1, &format!("{name} is not hex")))?;
            v.try_into()
                .map_err(|_| bad(i + 1, &format!("{name} is not 32 bytes")))
        };
        let origin = field(1, "origin")?.to_string();
        let size = field(2, "size")?
            .parse()
            .map_err(|_| bad(3, "size is not a number"))?;
        let root = hex32(3, "root")?;
        let time_ms = crate::time::parse_rfc3339(field(4, "time")?).map_err(|e| bad(5, &e))?;
        let key = hex32(5, "key")?;
        let signature =
            hex::decode(field(6, "signature")?).map_err(|_| bad(7, "signature is not hex"))?;
        if lines.len() > 7 {
            return Err(bad(8, "unexpected text after the signature"));
        }
        Ok(Self {
            origin,
            size,
            root,
            time_ms,
            key,
            signature,
        })
    }

    /// Checks the signature against `trusted_key` (the environment's key,
    /// not the one the checkpoint names).
    pub fn verify_signature(&self, trusted_key: &[u8; 32]) -> Result<(), AuditError> {
        if &self.key != trusted_key {
            return Err(AuditError::BadCheckpoint(
                "the checkpoint was signed by a different key than this environment's".into(),
            ));
        }
        UnparsedPublicKey::new(&ED25519, trusted_key)
            .verify(self.signed_message().as_bytes(), &self.signature)
            .map_err(|_| {
                AuditError::BadCheckpoint("the checkpoint signature does not verify".into())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> AuditKeys {
        let rng = ring::rand::SystemRandom::new();
        let pk = Ed25519KeyPair::generate_pkcs8(&rng).expect("keygen");
        AuditKeys::new(pk.as_ref(), &[7u8; 32]).expect("keys")
    }

    #[test]
    fn a_checkpoint_round_trips_through_text_and_verifies() {
        let k = keys();
        let cp = k.sign("env-1", 42, [3u8; 32], 1_795_737_600_000);
        let parsed = Checkpoint::parse(&cp.to_text()).expect("parse");
        assert_eq!(parsed, cp);
        parsed.verify_signature(&k.public_key()).expect("verifies");
    }

    #[test]
    fn any_changed_field_breaks_the_signature() {
        let k = keys();
        let cp = k.sign("env-1", 42, [3u8; 32], 1_795_737_600_000);
        let text = cp.to_text();
        for (from, to) in [
            ("size 42", "size 43"),
            ("origin env-1", "origin env-2"),
            ("root 0303", "root 0403"),
        ] {
            let forged = Checkpoint::parse(&text.replacen(from, to, 1)).expect("parse");
            assert!(forged.verify_signature(&k.public_key()).is_err(), "{from}");
        }
        let other = keys();
        assert!(cp.verify_signature(&other.public_key()).is_err());
    }

    #[test]
    fn malformed_text_names_the_line() {
        let err = Checkpoint::parse("cloister-audit-checkpoint v1\norigin x\nsize many\n")
            .expect_err("bad");
        assert!(err.to_string().contains("line 3"), "{err}");
    }
}
