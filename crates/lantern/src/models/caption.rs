//! Caption cleaning as LlamaGen applies it before T5 tokenisation (`language/t5.py`,
//! `clean_caption`, applied twice). Our own implementation of the step list in
//! `llamagen-spec.md` Appendix A. Not reproduced: the `ftfy` mojibake repair (no Rust port);
//! HTML stripping keeps text between tags, which matches the parser for ordinary captions.
use regex::Regex;
use std::sync::OnceLock;

struct Rules {
    url_a: Regex,
    url_b: Regex,
    html_tag: Regex,
    handle: Regex,
    cjk: Regex,
    dashes: Regex,
    dquotes: Regex,
    squotes: Regex,
    quot: Regex,
    ip: Regex,
    article_id: Regex,
    hash_short: Regex,
    hash_long: Regex,
    long_number: Regex,
    filename: Regex,
    multi_quote: Regex,
    multi_dot: Regex,
    punct_run: Regex,
    spaced_dot: Regex,
    dash_or_underscore: Regex,
    code_a: Regex,
    code_b: Regex,
    code_c: Regex,
    shipping: Regex,
    download: Regex,
    click: Regex,
    ext_words: Regex,
    page: Regex,
    mixed_code: Regex,
    dims: Regex,
    spaced_colon: Regex,
    sep_space: Regex,
    spaces: Regex,
    lead: Regex,
    trail: Regex,
    dot_only: Regex,
}

fn rules() -> &'static Rules {
    static RULES: OnceLock<Rules> = OnceLock::new();
    RULES.get_or_init(|| {
        let r = |s: &str| Regex::new(s).expect("caption-cleaning regexes are valid");
        Rules {
            url_a: r(r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b/?)\S*"),
            url_b: r(r"\bwww\.\S+"),
            html_tag: r(r"<[^>]*>"),
            handle: r(r"@[\w\d]+\b"),
            cjk: r(r"[\x{31c0}-\x{31ef}\x{31f0}-\x{31ff}\x{3200}-\x{32ff}\x{3300}-\x{33ff}\x{3400}-\x{4dbf}\x{4dc0}-\x{4dff}\x{4e00}-\x{9fff}]+"),
            dashes: r(r"[\x{002D}\x{058A}\x{05BE}\x{1400}\x{1806}\x{2010}-\x{2015}\x{2E17}\x{2E1A}\x{2E3A}\x{2E3B}\x{2E40}\x{301C}\x{3030}\x{30A0}\x{FE31}\x{FE32}\x{FE58}\x{FE63}\x{FF0D}]+"),
            dquotes: r("[`´«»“”¨]"),
            squotes: r("[‘’]"),
            quot: r(r"&quot;?|&amp"),
            ip: r(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}"),
            article_id: r(r"\d:\d\d\s+$"),
            hash_short: r(r"#\d{1,3}\b"),
            hash_long: r(r"#\d{5,}\b"),
            long_number: r(r"\b\d{6,}\b"),
            filename: r(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"),
            multi_quote: r(r#"["']{2,}"#),
            multi_dot: r(r"[\.]{2,}"),
            punct_run: r(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}"),
            spaced_dot: r(r"\s+\.\s+"),
            dash_or_underscore: r(r"[-_]"),
            code_a: r(r"\b[a-zA-Z]{1,3}\d{3,15}\b"),
            code_b: r(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"),
            code_c: r(r"\b\d+[a-zA-Z]+\d+\b"),
            shipping: r(r"(worldwide\s+)?(free\s+)?shipping"),
            download: r(r"(free\s)?download(\sfree)?"),
            click: r(r"\bclick\b\s(?:for|on)\s\w+"),
            ext_words: r(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?"),
            page: r(r"\bpage\s+\d+\b"),
            mixed_code: r(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b"),
            dims: r(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b"),
            spaced_colon: r(r"\s+:\s+"),
            sep_space: r(r"(\D[,\./])\b"),
            spaces: r(r"\s+"),
            lead: r(r"^['_,\-:;]"),
            trail: r(r"['_,\-:\-+]$"),
            dot_only: r(r"^\.\S+$"),
        }
    })
}

/// Percent-decoding with `+` as space (Python's `urllib.parse.unquote_plus`).
fn unquote_plus(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unescape_html(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

/// One pass of LlamaGen's caption cleaning.
fn clean_once(caption: &str) -> String {
    let r = rules();
    let mut c = unquote_plus(caption).trim().to_lowercase();
    c = c.replace("<person>", "person");
    c = r.url_a.replace_all(&c, "").into_owned();
    c = r.url_b.replace_all(&c, "").into_owned();
    c = r.html_tag.replace_all(&c, "").into_owned();
    c = r.handle.replace_all(&c, "").into_owned();
    c = r.cjk.replace_all(&c, "").into_owned();
    c = r.dashes.replace_all(&c, "-").into_owned();
    c = r.dquotes.replace_all(&c, "\"").into_owned();
    c = r.squotes.replace_all(&c, "'").into_owned();
    c = r.quot.replace_all(&c, "").into_owned();
    c = r.ip.replace_all(&c, " ").into_owned();
    c = r.article_id.replace_all(&c, "").into_owned();
    c = c.replace("\\n", " ");
    c = r.hash_short.replace_all(&c, "").into_owned();
    c = r.hash_long.replace_all(&c, "").into_owned();
    c = r.long_number.replace_all(&c, "").into_owned();
    c = r.filename.replace_all(&c, "").into_owned();
    c = r.multi_quote.replace_all(&c, "\"").into_owned();
    c = r.multi_dot.replace_all(&c, " ").into_owned();
    c = r.punct_run.replace_all(&c, " ").into_owned();
    c = r.spaced_dot.replace_all(&c, " ").into_owned();
    if r.dash_or_underscore.find_iter(&c).count() > 3 {
        c = r.dash_or_underscore.replace_all(&c, " ").into_owned();
    }
    c = unescape_html(&unescape_html(&c)).trim().to_string();
    c = r.code_a.replace_all(&c, "").into_owned();
    c = r.code_b.replace_all(&c, "").into_owned();
    c = r.code_c.replace_all(&c, "").into_owned();
    c = r.shipping.replace_all(&c, "").into_owned();
    c = r.download.replace_all(&c, "").into_owned();
    c = r.click.replace_all(&c, "").into_owned();
    c = r.ext_words.replace_all(&c, "").into_owned();
    c = r.page.replace_all(&c, "").into_owned();
    c = r.mixed_code.replace_all(&c, " ").into_owned();
    c = r.dims.replace_all(&c, "").into_owned();
    c = r.spaced_colon.replace_all(&c, ": ").into_owned();
    c = r.sep_space.replace_all(&c, "$1 ").into_owned();
    c = r.spaces.replace_all(&c, " ").into_owned();
    c = c.trim().to_string();
    for q in ['"', '\''] {
        if c.len() >= 2 && c.starts_with(q) && c.ends_with(q) {
            c = c[1..c.len() - 1].to_string();
            break;
        }
    }
    c = r.lead.replace(&c, "").into_owned();
    c = r.trail.replace(&c, "").into_owned();
    c = r.dot_only.replace(&c, "").into_owned();
    c.trim().to_string()
}

/// LlamaGen's caption preprocessing: the cleaning pass applied twice.
pub fn clean_caption(caption: &str) -> String {
    clean_once(&clean_once(caption))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_urls_handles_quotes_and_case() {
        assert_eq!(
            clean_caption("A  Red CAR at https://example.com/x.jpg by @someone"),
            "a red car at by"
        );
        assert_eq!(clean_caption("“Quoted”"), "quoted");
        assert_eq!(clean_caption("a%20cat+on+a+mat"), "a cat on a mat");
        assert_eq!(
            clean_caption("photo of a dog...in the park"),
            "photo of a dog in the park"
        );
        assert_eq!(clean_caption("<b>bold</b> text"), "bold text");
    }
}
