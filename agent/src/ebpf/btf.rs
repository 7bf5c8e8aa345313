//! Just enough of a BTF reader to find member offsets in the running kernel's
//! `/sys/kernel/btf/vmlinux`. aya applies CO-RE relocations only to C programs; the Rust eBPF
//! programs get the two `task_struct` offsets they need as globals set before load instead.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("struct {0} not found in BTF")]
    NoStruct(String),
    #[error("member {1} not found in struct {0}")]
    NoMember(String, String),
    #[error("value {1} not found in enum {0}")]
    NoEnumValue(String, String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;

pub struct Btf {
    data: Vec<u8>,
    strings_start: usize,
    strings_len: usize,
    /// Byte offset of each type record, by type id (id 0 is `void`).
    type_offsets: Vec<usize>,
    structs_by_name: HashMap<String, u32>,
    enums_by_name: HashMap<String, u32>,
}

/// The NUL-terminated name at `off` in the string section.
fn string_at(data: &[u8], start: usize, len: usize, off: usize) -> Result<&str, BtfError> {
    if off >= len {
        return Err(BtfError::Malformed("string offset out of bounds"));
    }
    let s = &data[start + off..start + len];
    let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
    std::str::from_utf8(&s[..end]).map_err(|_| BtfError::Malformed("non-UTF-8 name"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Btf::parse(std::fs::read("/sys/kernel/btf/vmlinux")?)
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf, BtfError> {
        let u32_at = |off: usize| -> Result<u32, BtfError> {
            data.get(off..off + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .ok_or(BtfError::Malformed("truncated"))
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err(BtfError::Malformed(
                "bad magic (only little-endian BTF is read)",
            ));
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings_start = hdr_len + str_off;
        if types_end > data.len() || strings_start + str_len > data.len() {
            return Err(BtfError::Malformed("sections out of bounds"));
        }
        let mut btf = Btf {
            strings_start,
            strings_len: str_len,
            type_offsets: vec![0],
            structs_by_name: HashMap::new(),
            enums_by_name: HashMap::new(),
            data: Vec::new(),
        };
        let mut off = types_start;
        while off + 12 <= types_end {
            let info = u32_at(off + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let trailing = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            let id = btf.type_offsets.len() as u32;
            btf.type_offsets.push(off);
            let by_name = match kind {
                KIND_STRUCT => Some(&mut btf.structs_by_name),
                KIND_ENUM => Some(&mut btf.enums_by_name),
                _ => None,
            };
            let name_off = u32_at(off)? as usize;
            if let Some(by_name) = by_name.filter(|_| name_off != 0) {
                let name = string_at(&data, strings_start, str_len, name_off)?;
                by_name.insert(name.to_owned(), id);
            }
            off += 12 + trailing;
        }
        btf.data = data;
        Ok(btf)
    }

    fn string<'d>(&self, data: &'d [u8], off: usize) -> Result<&'d str, BtfError> {
        string_at(data, self.strings_start, self.strings_len, off)
    }

    /// The value of `variant` in `enum name` (a 32-bit enum).
    pub fn enum_value(&self, name: &str, variant: &str) -> Result<i64, BtfError> {
        let no_value = || BtfError::NoEnumValue(name.to_owned(), variant.to_owned());
        let id = *self.enums_by_name.get(name).ok_or_else(no_value)?;
        let off = self.type_offsets[id as usize];
        let vlen = (self.u32_at(off + 4) & 0xffff) as usize;
        for i in 0..vlen {
            let e = off + 12 + 8 * i;
            if self.string(&self.data, self.u32_at(e) as usize)? == variant {
                return Ok(i64::from(self.u32_at(e + 4) as i32));
            }
        }
        Err(no_value())
    }

    fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.data[off..off + 4].try_into().unwrap())
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous struct/union members.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        self.find_member(id, member, 0, 0)?
            .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))
    }

    fn find_member(
        &self,
        id: u32,
        member: &str,
        base_bits: u32,
        depth: u32,
    ) -> Result<Option<u32>, BtfError> {
        let Some(&off) = self.type_offsets.get(id as usize) else {
            return Err(BtfError::Malformed("type id out of range"));
        };
        let info = self.u32_at(off + 4);
        let (kind, vlen, kind_flag) = (
            (info >> 24) & 0x1f,
            (info & 0xffff) as usize,
            info >> 31 == 1,
        );
        if !(kind == KIND_STRUCT || kind == KIND_UNION) || depth > 8 {
            return Ok(None);
        }
        for i in 0..vlen {
            let m = off + 12 + 12 * i;
            let (name_off, type_id, raw_offset) =
                (self.u32_at(m), self.u32_at(m + 4), self.u32_at(m + 8));
            let bits = base_bits
                + if kind_flag {
                    raw_offset & 0x00ff_ffff
                } else {
                    raw_offset
                };
            if name_off == 0 {
                if let Some(found) =
                    self.find_member(self.skip_modifiers(type_id), member, bits, depth + 1)?
                {
                    return Ok(Some(found));
                }
            } else if self.string(&self.data, name_off as usize)? == member {
                return Ok(Some(bits / 8));
            }
        }
        Ok(None)
    }

    /// Follows typedef/volatile/const/restrict/type_tag to the underlying type.
    fn skip_modifiers(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            let Some(&off) = self.type_offsets.get(id as usize) else {
                return id;
            };
            let kind = (self.u32_at(off + 4) >> 24) & 0x1f;
            if !matches!(kind, 8..=11 | 18) {
                return id;
            }
            id = self.u32_at(off + 8);
        }
        id
    }

    #[cfg(test)]
    fn types(&self) -> usize {
        self.type_offsets.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_struct_offsets_in_the_running_kernel() {
        let btf = Btf::from_sys_fs().expect("this kernel has BTF at /sys/kernel/btf/vmlinux");
        assert!(btf.types() > 10_000);
        let tgid = btf.member_offset("task_struct", "tgid").unwrap();
        let parent = btf.member_offset("task_struct", "real_parent").unwrap();
        assert!(
            tgid > 0 && parent > tgid,
            "tgid at {tgid}, real_parent at {parent}"
        );
        assert!(matches!(
            btf.member_offset("task_struct", "no_such_member"),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn finds_the_socket_and_iov_iter_layout_in_the_running_kernel() {
        let btf = Btf::from_sys_fs().unwrap();
        // Through anonymous unions and structs: skc_num sits in skc_portpair's struct.
        let num = btf.member_offset("sock_common", "skc_num").unwrap();
        let dport = btf.member_offset("sock_common", "skc_dport").unwrap();
        assert_eq!(num, dport + 2);
        let ubuf = btf.member_offset("iov_iter", "ubuf").unwrap();
        let iov = btf
            .member_offset("iov_iter", "__iov")
            .or_else(|_| btf.member_offset("iov_iter", "iov"))
            .unwrap();
        assert_eq!(ubuf, iov, "one union");
        assert_eq!(btf.member_offset("iov_iter", "iter_type").unwrap(), 0);
        let ubuf_type = btf.enum_value("iter_type", "ITER_UBUF").unwrap();
        let iovec_type = btf.enum_value("iter_type", "ITER_IOVEC").unwrap();
        assert_ne!(ubuf_type, iovec_type);
        assert!(matches!(
            btf.enum_value("iter_type", "ITER_NONE"),
            Err(BtfError::NoEnumValue(..))
        ));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        let mut hdr = vec![0u8; 24];
        hdr[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        hdr[4..8].copy_from_slice(&24u32.to_le_bytes());
        hdr[12..16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(
            Btf::parse(hdr).is_err(),
            "a type section past the end is refused"
        );
    }
}
