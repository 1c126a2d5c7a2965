//! Decoding of PostgreSQL's on-disk `numeric` format (the bytes after the varlena header) into an exact
//! value, and from there into a scaled 128-bit integer (for Parquet decimals) or canonical text (for
//! unconstrained numerics). Pure: no rounding anywhere; a value that does not fit is an error.
//!
//! Layout (PostgreSQL's numeric.c): a 16-bit header word, then for the long format a 16-bit weight,
//! then base-10000 digits as 16-bit integers. Short format: bit 15 set, bit 14 clear; sign in 0x2000,
//! display scale in 0x1F80 >> 7, weight as a 7-bit signed number in 0x007F. Special values have bits
//! 15 and 14 set: 0xC000 NaN, 0xD000 +Infinity, 0xF000 -Infinity. Long format: sign in 0xC000 (0x0000
//! positive, 0x4000 negative), display scale in 0x3FFF. Value = Σ digit[i] · 10000^(weight − i).

use crate::error::{Error, ErrorKind, Result};

const DEC_DIGITS: i32 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Numeric {
    NaN,
    PositiveInfinity,
    NegativeInfinity,
    Finite { negative: bool, weight: i16, dscale: u16, digits: Vec<i16> },
}

fn bad(msg: &str) -> Error {
    Error::new(ErrorKind::Internal, format!("corrupt numeric value: {msg}"))
}

/// Decodes the payload of a numeric datum (without its varlena header). Native (little) endian, as the
/// server writes it on this machine.
pub fn decode(payload: &[u8]) -> Result<Numeric> {
    if payload.len() < 2 {
        return Err(bad("too short"));
    }
    let word = |i: usize| u16::from_ne_bytes([payload[i], payload[i + 1]]);
    let header = word(0);
    let digits_from = |start: usize| -> Result<Vec<i16>> {
        let rest = &payload[start..];
        if !rest.len().is_multiple_of(2) {
            return Err(bad("odd digit bytes"));
        }
        let digits: Vec<i16> = rest.chunks_exact(2).map(|c| i16::from_ne_bytes([c[0], c[1]])).collect();
        if digits.iter().any(|d| !(0..10_000).contains(d)) {
            return Err(bad("digit out of range"));
        }
        Ok(digits)
    };
    match header & 0xC000 {
        0xC000 => match header & 0xF000 {
            0xC000 => Ok(Numeric::NaN),
            0xD000 => Ok(Numeric::PositiveInfinity),
            0xF000 => Ok(Numeric::NegativeInfinity),
            _ => Err(bad("unknown special value")),
        },
        0x8000 => {
            let negative = header & 0x2000 != 0;
            let dscale = (header & 0x1F80) >> 7;
            let raw_weight = (header & 0x007F) as i16;
            let weight = if header & 0x0040 != 0 { raw_weight | !0x007F } else { raw_weight };
            Ok(Numeric::Finite { negative, weight, dscale, digits: digits_from(2)? })
        }
        sign => {
            if payload.len() < 4 {
                return Err(bad("too short for the long format"));
            }
            let weight = word(2) as i16;
            Ok(Numeric::Finite { negative: sign == 0x4000, weight, dscale: header & 0x3FFF, digits: digits_from(4)? })
        }
    }
}

impl Numeric {
    /// The value times 10^scale as an i128, if it is finite, has no digits beyond `scale` and fits in
    /// `precision` decimal digits. Never rounds. Errors never carry the value: their texts reach
    /// users who may not read the table.
    pub fn to_scaled_i128(&self, precision: u8, scale: i8) -> Result<i128> {
        let Numeric::Finite { negative, weight, digits, .. } = self else {
            return Err(Error::new(
                ErrorKind::DataConversion,
                format!("a NaN or infinite numeric value cannot be written to a decimal({precision},{scale}) column"),
            )
            .with_hint("NaN and infinity have no decimal representation in the landing zone."));
        };
        let overflow = || {
            Error::new(ErrorKind::DataConversion, format!("a numeric value does not fit decimal({precision},{scale})"))
        };
        // Each base-10000 digit i stands for digit * 10^(4*(weight-i)); scaled by 10^scale.
        let mut acc: i128 = 0;
        for (i, &d) in digits.iter().enumerate() {
            let exp10 = DEC_DIGITS * (*weight as i32 - i as i32) + scale as i32;
            let d = d as i128;
            if exp10 >= 0 {
                let term = d.checked_mul(pow10(exp10).ok_or_else(overflow)?).ok_or_else(overflow)?;
                acc = acc.checked_add(term).ok_or_else(overflow)?;
            } else {
                let div = pow10(-exp10).ok_or_else(overflow)?;
                if d % div != 0 {
                    return Err(overflow()); // a digit below the scale: would need rounding
                }
                acc = acc.checked_add(d / div).ok_or_else(overflow)?;
            }
        }
        let limit = pow10(precision as i32).ok_or_else(overflow)?;
        if acc >= limit {
            return Err(overflow());
        }
        Ok(if *negative { -acc } else { acc })
    }

    /// Exactly what PostgreSQL's `numeric_out` prints: `NaN`, `Infinity`, `-Infinity`, or the digits
    /// with `dscale` fractional digits.
    pub fn to_text(&self) -> String {
        let (negative, weight, dscale, digits) = match self {
            Numeric::NaN => return "NaN".into(),
            Numeric::PositiveInfinity => return "Infinity".into(),
            Numeric::NegativeInfinity => return "-Infinity".into(),
            Numeric::Finite { negative, weight, dscale, digits } => (*negative, *weight as i32, *dscale as i32, digits),
        };
        let digit = |i: i32| -> i16 {
            if i >= 0 && (i as usize) < digits.len() {
                digits[i as usize]
            } else {
                0
            }
        };
        let mut s = String::new();
        if negative && digits.iter().any(|&d| d != 0) {
            s.push('-');
        }
        // integer part
        if weight < 0 {
            s.push('0');
        } else {
            for i in 0..=weight {
                let d = digit(i);
                if i == 0 {
                    s.push_str(&d.to_string());
                } else {
                    s.push_str(&format!("{d:04}"));
                }
            }
        }
        if dscale > 0 {
            s.push('.');
            let mut frac = String::new();
            let mut i = weight + 1;
            while (frac.len() as i32) < dscale {
                frac.push_str(&format!("{:04}", digit(i)));
                i += 1;
            }
            frac.truncate(dscale as usize);
            s.push_str(&frac);
        }
        s
    }
}

fn pow10(exp: i32) -> Option<i128> {
    if !(0..=38).contains(&exp) {
        return None;
    }
    Some(10i128.pow(exp as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn long(negative: bool, weight: i16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((if negative { 0x4000u16 } else { 0 }) | dscale).to_ne_bytes());
        v.extend_from_slice(&weight.to_ne_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_ne_bytes());
        }
        v
    }

    fn short(negative: bool, weight: i16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let h: u16 = 0x8000 | if negative { 0x2000 } else { 0 } | (dscale << 7) | (weight as u16 & 0x007F);
        let mut v = h.to_ne_bytes().to_vec();
        for d in digits {
            v.extend_from_slice(&d.to_ne_bytes());
        }
        v
    }

    #[test]
    fn specials() {
        assert_eq!(decode(&0xC000u16.to_ne_bytes()).unwrap(), Numeric::NaN);
        assert_eq!(decode(&0xD000u16.to_ne_bytes()).unwrap().to_text(), "Infinity");
        assert_eq!(decode(&0xF000u16.to_ne_bytes()).unwrap().to_text(), "-Infinity");
        assert!(Numeric::NaN.to_scaled_i128(10, 2).unwrap_err().kind == ErrorKind::DataConversion);
    }

    #[test]
    fn text_matches_numeric_out() {
        // 12345.678 = [1][2345].[6780], weight 1, dscale 3
        let n = decode(&short(false, 1, 3, &[1, 2345, 6780])).unwrap();
        assert_eq!(n.to_text(), "12345.678");
        assert_eq!(n.to_scaled_i128(10, 3).unwrap(), 12_345_678);
        assert_eq!(n.to_scaled_i128(10, 5).unwrap(), 1_234_567_800);
        assert!(n.to_scaled_i128(10, 2).is_err(), "would round");
        assert!(n.to_scaled_i128(7, 3).is_err(), "precision overflow");
        // -0.0012 = weight -1, digits [12], dscale 4
        let n = decode(&short(true, -1, 4, &[12])).unwrap();
        assert_eq!(n.to_text(), "-0.0012");
        assert_eq!(n.to_scaled_i128(5, 4).unwrap(), -12);
        // zero with scale: no digits
        let z = decode(&short(false, 0, 2, &[])).unwrap();
        assert_eq!(z.to_text(), "0.00");
        assert_eq!(z.to_scaled_i128(3, 2).unwrap(), 0);
        // 1e20 = weight 5, digits [1], dscale 0
        let big = decode(&long(false, 5, 0, &[1])).unwrap();
        assert_eq!(big.to_text(), "100000000000000000000");
        assert_eq!(big.to_scaled_i128(38, 0).unwrap(), 10i128.pow(20));
        // trailing zeros in digits beyond dscale are not printed
        let n = decode(&long(false, 0, 1, &[7, 5000])).unwrap();
        assert_eq!(n.to_text(), "7.5");
    }

    #[test]
    fn thirty_eight_digits_fit_and_thirty_nine_do_not() {
        // 10^38 - 1 = 99..9 (38 nines): weight 9, digits [99, 9999 x 9]
        let mut digits = vec![99i16];
        digits.extend(std::iter::repeat(9999).take(9));
        let n = decode(&long(true, 9, 0, &digits)).unwrap();
        assert_eq!(n.to_scaled_i128(38, 0).unwrap(), -(10i128.pow(38) - 1));
        assert_eq!(n.to_text(), format!("-{}", "9".repeat(38)));
        let mut digits = vec![999i16];
        digits.extend(std::iter::repeat(9999).take(9));
        let n = decode(&long(false, 9, 0, &digits)).unwrap();
        assert!(n.to_scaled_i128(38, 0).is_err());
        assert_eq!(n.to_text(), "9".repeat(39));
    }

    #[test]
    fn rejects_corrupt_input() {
        assert!(decode(&[1]).is_err());
        assert!(decode(&long(false, 0, 0, &[10_000])).is_err());
        assert!(decode(&[0, 0, 0]).is_err());
    }
}
