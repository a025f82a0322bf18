//! Just enough of a BTF reader to find a struct member's offset in the running kernel
//! (`/sys/kernel/btf/vmlinux`), so the verdict can read `tcp_sock.write_seq` without CO-RE.

use anyhow::{bail, Context};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// Byte offset of `member` in `struct name`.
pub fn member_offset(name: &str, member: &str) -> anyhow::Result<u32> {
    let data =
        std::fs::read("/sys/kernel/btf/vmlinux").context("reading /sys/kernel/btf/vmlinux")?;
    member_offset_in(&data, name, member)
}

fn u16_at(d: &[u8], o: usize) -> anyhow::Result<u16> {
    Ok(u16::from_le_bytes(
        d.get(o..o + 2).context("truncated BTF")?.try_into()?,
    ))
}

fn u32_at(d: &[u8], o: usize) -> anyhow::Result<u32> {
    Ok(u32::from_le_bytes(
        d.get(o..o + 4).context("truncated BTF")?.try_into()?,
    ))
}

fn str_at(strings: &[u8], off: u32) -> &[u8] {
    let s = strings.get(off as usize..).unwrap_or_default();
    &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
}

fn member_offset_in(d: &[u8], name: &str, member: &str) -> anyhow::Result<u32> {
    if u16_at(d, 0)? != BTF_MAGIC {
        bail!("not little-endian BTF");
    }
    let hdr_len = u32_at(d, 4)? as usize;
    let type_off = u32_at(d, 8)? as usize;
    let type_len = u32_at(d, 12)? as usize;
    let str_off = u32_at(d, 16)? as usize;
    let str_len = u32_at(d, 20)? as usize;
    let types = d
        .get(hdr_len + type_off..hdr_len + type_off + type_len)
        .context("BTF type section out of range")?;
    let strings = d
        .get(hdr_len + str_off..hdr_len + str_off + str_len)
        .context("BTF string section out of range")?;
    let mut o = 0;
    while o + 12 <= types.len() {
        let name_off = u32_at(types, o)?;
        let info = u32_at(types, o + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 != 0;
        let body = o + 12;
        let extra = match kind {
            1 => 4,             // INT
            3 => 12,            // ARRAY
            4 | 5 => 12 * vlen, // STRUCT, UNION
            6 => 8 * vlen,      // ENUM
            13 => 8 * vlen,     // FUNC_PROTO
            14 => 4,            // VAR
            15 => 12 * vlen,    // DATASEC
            17 => 4,            // DECL_TAG
            19 => 12 * vlen,    // ENUM64
            2 | 7..=12 | 16 | 18 => 0,
            other => bail!("unknown BTF kind {other}"),
        };
        if kind == KIND_STRUCT && str_at(strings, name_off) == name.as_bytes() {
            for i in 0..vlen {
                let m = body + 12 * i;
                if str_at(strings, u32_at(types, m)?) == member.as_bytes() {
                    let raw = u32_at(types, m + 8)?;
                    let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                    if bits % 8 != 0 {
                        bail!("{name}.{member} is a bitfield");
                    }
                    return Ok(bits / 8);
                }
            }
            bail!("struct {name} has no member {member}");
        }
        o = body + extra;
    }
    bail!("struct {name} not found in the kernel's BTF")
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_tcp_sock_write_seq() {
        if std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            let off = super::member_offset("tcp_sock", "write_seq").unwrap();
            assert!(off > 0);
        }
    }
}
