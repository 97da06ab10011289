//! The agent's proof of its secret: HMAC-SHA256 over a fresh controller nonce, so the
//! secret itself never crosses the transport (a Kafka topic or a TCP link alike), and a
//! recorded proof is useless for the next connection.

use sha2::{Digest, Sha256};

const BLOCK: usize = 64;

pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// What the agent sends back for `nonce`.
pub fn proof(secret: &str, agent: &str, nonce: &[u8]) -> [u8; 32] {
    let mut msg = Vec::with_capacity(nonce.len() + agent.len() + 1);
    msg.extend_from_slice(nonce);
    msg.push(0);
    msg.extend_from_slice(agent.as_bytes());
    hmac_sha256(secret.as_bytes(), &msg)
}

/// Compare without leaking where the first difference is.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh random nonce (from the OS).
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut n);
    }
    // Mix in time and address entropy too, should /dev/urandom be unavailable.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mixed = Sha256::digest(
        [
            &n[..],
            &t.to_le_bytes(),
            &(&n as *const _ as usize).to_le_bytes(),
        ]
        .concat(),
    );
    mixed.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn proofs_bind_secret_nonce_and_agent() {
        let n = nonce();
        assert_ne!(n, nonce());
        let p = proof("s3cret", "agent-1", &n);
        assert!(same(&p, &proof("s3cret", "agent-1", &n)));
        assert!(!same(&p, &proof("s3cret", "agent-2", &n)));
        assert!(!same(&p, &proof("other", "agent-1", &n)));
        assert!(!same(&p, &proof("s3cret", "agent-1", &nonce())));
    }
}
