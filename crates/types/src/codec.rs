//! The stored form of a record: compact, length-prefixed binary. The label
//! is not part of it (labels live apart, with provenance). Dataset
//! segments store records in it, and plugin-stage tasks carry them to
//! workers in it.

use crate::types::{DataRecord, Numeric, NumericField, TextField};

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Encodes texts and numerics (not id, not label).
pub fn encode(r: &DataRecord, out: &mut Vec<u8>) {
    out.extend_from_slice(&(r.texts.len() as u32).to_le_bytes());
    for t in &r.texts {
        put_bytes(out, t.name.as_bytes());
        put_bytes(out, t.value.as_bytes());
    }
    out.extend_from_slice(&(r.numerics.len() as u32).to_le_bytes());
    for n in &r.numerics {
        put_bytes(out, n.name.as_bytes());
        match &n.value {
            Numeric::Scalar(v) => {
                out.push(0);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Numeric::Vector(vs) => {
                out.push(1);
                out.extend_from_slice(&(vs.len() as u32).to_le_bytes());
                for v in vs {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<usize> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?) as usize)
    }
    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()?;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// Decodes [`encode`]'s output; `None` if the bytes are damaged.
pub fn decode(id: String, bytes: &[u8]) -> Option<DataRecord> {
    let mut c = Cursor(bytes);
    let nt = c.u32()?;
    let mut texts = Vec::with_capacity(nt.min(1024));
    for _ in 0..nt {
        texts.push(TextField {
            name: c.string()?,
            value: c.string()?,
        });
    }
    let nn = c.u32()?;
    let mut numerics = Vec::with_capacity(nn.min(1024));
    for _ in 0..nn {
        let name = c.string()?;
        let value = match c.take(1)?[0] {
            0 => Numeric::Scalar(c.f64()?),
            1 => {
                let len = c.u32()?;
                if len > c.0.len() / 8 {
                    return None;
                }
                let mut v = Vec::with_capacity(len);
                for _ in 0..len {
                    v.push(c.f64()?);
                }
                Numeric::Vector(v)
            }
            _ => return None,
        };
        numerics.push(NumericField { name, value });
    }
    c.0.is_empty().then_some(DataRecord {
        id,
        texts,
        numerics,
        label: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let r = DataRecord {
            id: "x".into(),
            texts: vec![TextField {
                name: "text".into(),
                value: "héllo".into(),
            }],
            numerics: vec![
                NumericField {
                    name: "n".into(),
                    value: Numeric::Scalar(1.5),
                },
                NumericField {
                    name: "v".into(),
                    value: Numeric::Vector(vec![1.0, 2.0]),
                },
            ],
            label: None,
        };
        let mut buf = Vec::new();
        encode(&r, &mut buf);
        assert_eq!(decode("x".into(), &buf), Some(r));
        for cut in 0..buf.len() {
            assert_eq!(decode("x".into(), &buf[..cut]), None, "cut at {cut}");
        }
    }
}
