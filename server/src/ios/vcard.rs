//! Contacts as vCard 4.0 (RFC 6350): one `VCARD` per contact with `FN`, `N`, `ORG`,
//! `TITLE`, `TEL`, `EMAIL`, `ADR` and `NOTE`; values escaped (`\\`, `\,`, `\;`, `\n`) and
//! lines folded at 75 octets, CRLF-terminated.

use super::preview::Contact;

/// Escapes a text value (RFC 6350 §3.4).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            ',' => out.push_str("\\,"),
            ';' => out.push_str("\\;"),
            '\n' => out.push_str("\\n"),
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Appends one content line, folded so no line exceeds 75 octets (never inside a
/// character), each continuation starting with a space.
fn line(out: &mut String, text: &str) {
    let mut width = 0;
    for c in text.chars() {
        let len = c.len_utf8();
        if width + len > 75 {
            out.push_str("\r\n ");
            width = 1;
        }
        out.push(c);
        width += len;
    }
    out.push_str("\r\n");
}

/// A vCard `TYPE` from a phone's label.
fn kind(label: &str) -> Option<&'static str> {
    match label.to_ascii_lowercase().as_str() {
        "mobile" | "iphone" => Some("cell"),
        "home" => Some("home"),
        "work" => Some("work"),
        _ => None,
    }
}

fn typed(out: &mut String, prop: &str, label: &str, value: &str) {
    match kind(label) {
        Some(t) => line(out, &format!("{prop};TYPE={t}:{}", escape(value))),
        None => line(out, &format!("{prop}:{}", escape(value))),
    }
}

pub fn contact(out: &mut String, c: &Contact) {
    line(out, "BEGIN:VCARD");
    line(out, "VERSION:4.0");
    line(out, &format!("FN:{}", escape(&c.display_name())));
    let part = |p: &Option<String>| escape(p.as_deref().unwrap_or(""));
    line(out, &format!("N:{};{};{};;", part(&c.last), part(&c.first), part(&c.middle)));
    if let Some(o) = &c.organization {
        line(out, &format!("ORG:{}", escape(o)));
    }
    if let Some(t) = &c.job_title {
        line(out, &format!("TITLE:{}", escape(t)));
    }
    for p in &c.phones {
        typed(out, "TEL", &p.label, &p.value);
    }
    for e in &c.emails {
        typed(out, "EMAIL", &e.label, &e.value);
    }
    for a in &c.addresses {
        // The whole address as the street part: the backup keeps its parts as labelled text.
        let mut adr = String::from("ADR");
        if let Some(t) = kind(&a.label) {
            adr.push_str(&format!(";TYPE={t}"));
        }
        line(out, &format!("{adr}:;;{};;;;", escape(&a.value)));
    }
    if let Some(n) = &c.note {
        line(out, &format!("NOTE:{}", escape(n)));
    }
    line(out, "END:VCARD");
}

/// Every contact, one after another.
pub fn contacts(list: &[Contact]) -> String {
    let mut out = String::new();
    for c in list {
        contact(&mut out, c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ios::preview::Labelled;

    #[test]
    fn a_contact_is_escaped_folded_and_typed() {
        let c = Contact {
            id: 1,
            first: Some("Anna".into()),
            middle: None,
            last: Some("Lindqvist; Jr, \\".into()),
            organization: Some("Acme".into()),
            job_title: None,
            note: Some(format!("line one\nline two {}", "é".repeat(60))),
            phones: vec![Labelled { label: "Mobile".into(), value: "+1 555 0100".into() }],
            emails: vec![Labelled { label: "custom".into(), value: "anna@example.com".into() }],
            addresses: vec![],
        };
        let mut out = String::new();
        contact(&mut out, &c);
        let lines: Vec<&str> = out.split("\r\n").collect();
        assert_eq!(
            &lines[..6],
            [
                "BEGIN:VCARD",
                "VERSION:4.0",
                "FN:Anna Lindqvist\\; Jr\\, \\\\",
                "N:Lindqvist\\; Jr\\, \\\\;Anna;;;",
                "ORG:Acme",
                "TEL;TYPE=cell:+1 555 0100",
            ]
        );
        assert_eq!(lines[6], "EMAIL:anna@example.com");
        assert!(lines.iter().all(|l| l.len() <= 75), "{lines:?}");
        assert!(lines[8].starts_with(' '), "the long note is folded");
        let unfolded = out.replace("\r\n ", "");
        assert!(unfolded.contains(&format!("NOTE:line one\\nline two {}\r\n", "é".repeat(60))));
        assert!(out.ends_with("END:VCARD\r\n"));
    }
}
