//! The fast reader against serde-saphyr: whatever text the fast reader accepts must mean the
//! same to both (the same documents, the same values), and what serde-saphyr refuses the fast
//! reader must leave to it. Hand-picked cases, then generated and mutated texts.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::super::tape::Node;
use super::{Sink, read};

/// What the fast reader made of a text: every document as a Value, streamed items put back.
fn fast(text: &str) -> Result<Vec<Value>, super::Unsupported> {
    #[derive(Default)]
    struct Collect {
        documents: Vec<Value>,
        items: Vec<Value>,
        expected: usize,
    }
    impl Sink for Collect {
        fn begin(&mut self, documents: usize) {
            self.expected = documents;
        }
        fn item(&mut self, _document: usize, index: usize, item: Node<'_>) {
            assert_eq!(index, self.items.len());
            self.items.push(item.to_value());
        }
        fn document(
            &mut self,
            document: usize,
            root: Node<'_>,
            streamed: Option<usize>,
            _span: std::ops::Range<usize>,
        ) {
            assert_eq!(document, self.documents.len());
            let mut value = root.to_value();
            if let Some(count) = streamed {
                assert_eq!(count, self.items.len());
                value["items"] = Value::Array(std::mem::take(&mut self.items));
            }
            self.documents.push(value);
        }
    }
    let mut collect = Collect::default();
    let count = read(text, &mut collect)?;
    assert_eq!(count, collect.documents.len());
    assert_eq!(count, collect.expected);
    Ok(collect.documents)
}

/// What the loader's other reader makes of it, with the loader's options.
fn reference(text: &str) -> Result<Vec<Value>, String> {
    serde_saphyr::from_str_multiple_with_options::<Value, Vec<Value>>(
        text,
        super::super::yaml_options(text.len()),
    )
    .map_err(|e| e.to_string())
}

/// Checks the two readers agree; returns whether the fast one read the text.
fn agree(text: &str) -> bool {
    match (fast(text), reference(text)) {
        (Ok(fast), Ok(reference)) => {
            assert_eq!(fast, reference, "the readers differ on {text:?}");
            true
        }
        (Ok(fast), Err(error)) => {
            panic!("the fast reader accepted what serde-saphyr refuses ({error}): {text:?} read as {fast:?}")
        }
        (Err(_), _) => false,
    }
}

#[track_caller]
fn accepted(text: &str) {
    assert!(
        agree(text),
        "left to serde-saphyr: {text:?}: {:?}",
        fast(text).err()
    );
}

#[test]
fn block_structure_kubectl_writes() {
    for text in [
        "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: web\n    namespace: shop\n  spec:\n    ports:\n    - name: http\n      port: 80\n      protocol: TCP\n      targetPort: 8080\nkind: List\nmetadata:\n  resourceVersion: \"\"\n",
        "a:\n- 1\n- 2\nb: {x: 1, y: [a, b, ]}\n",
        "a:\n  - x\n  - y\n",
        "a:\n- x\n-\n- z\n",
        "- - a\n  - b\n- c\n",
        "a: {}\nb: []\nc:\nd: ~\n",
        "1: a\ntrue: b\n\"q\": c\n'r': d\n",
        "k: x #c\nj: x#c\n",
        "k:\ty\n",
        "k:    \n  - a\n",
        "-\n  a: 1\n- b\n",
        "a:\n  b:\n    c:\n    - d: 1\n      e: [2]\n  f: g\n",
        "a: 1\r\nb:\r\n- c\r\n",
        "# leading comment\n\na: 1 # trailing\n\n# between\nb: 2\n",
        "a: b:c\nd: http://x:80/y\n",
        "a: -1\nb: -x\nc: :x\n",
        "a: 'it''s'\nb: \"\\u00e9\\x41\\t\\\\\\\"\"\nc: ''\nd: \"\"\n",
    ] {
        accepted(text);
    }
}

#[test]
fn scalars_resolve_as_serde_saphyr_resolves_them() {
    let words = [
        "null",
        "Null",
        "NULL",
        "~",
        "true",
        "True",
        "TRUE",
        "tRUE",
        "yes",
        "Yes",
        "no",
        "on",
        "off",
        "y",
        "n",
        "0",
        "-0",
        "+1",
        "012",
        "-012",
        "0o17",
        "0x1F",
        "0X1F",
        "0b101",
        "1_000",
        "1__0",
        "_1",
        "1_",
        "1e3",
        "1E3",
        "1.5",
        "-1.5",
        ".5",
        "5.",
        "+.5",
        "-.5",
        "1:30",
        "2026-10-01T08:00:00Z",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "-9223372036854775809",
        "18446744073709551615",
        "18446744073709551616",
        "1.0e+3",
        "=",
        "<<",
        "123abc",
        "0.",
        "00",
        "0o8",
        "0xG",
        "1e",
        "+",
        "1.2.3",
        "0777",
        "1,000",
        "inf",
        "nan",
        "infinity",
        "+.nan",
        "-.nan",
        "-0x10",
        "-0o7",
        "-0b1",
        "+0x10",
        "0x",
        "0o",
        "1e-400",
        "3.14159265358979323846",
        "1e308",
        "0x_1",
        "0x1_0",
    ];
    for word in words {
        agree(&format!("k: {word}\n"));
        agree(&format!("- {word}\n"));
        agree(&format!("k: [{word}]\n"));
        agree(&format!("{word}: v\n"));
    }
    // Those that make serde-saphyr refuse the text are left to it.
    for word in [".inf", "-.inf", ".NaN", "1e999", "-1e999"] {
        assert!(!agree(&format!("k: {word}\n")), "{word}");
    }
}

#[test]
fn multi_line_scalars_fold_as_yaml_folds_them() {
    for text in [
        "a: x\n  y\n\n  z\nb: 1\n",
        "a: 'x\n  y\n\n  z'\n",
        "a: \"x \\\n   y\"\n",
        "k: \"a\n\n\n  b\"\n",
        "a: |\n  x\n\n  y\n\nb: 2\n",
        "a: |+\n  x\n\n\nb: 2\n",
        "a: |-\n  x\n\n\nb: 2\n",
        "a: |\n  x\n    more\n  less\n",
        "a: |\n  # not a comment\n  x: y\n",
        "- |\n  in a sequence\n- x\n",
        "a:\n  long plain text\n  over lines\n",
        "message: '0/3 nodes are available: 3 node(s) didn''t match Pod''s node affinity/selector.\n    preemption: 0/3 nodes are available.'\n",
    ] {
        accepted(text);
    }
}

#[test]
fn documents_count_as_serde_saphyr_counts_them() {
    for text in [
        "",
        "\n",
        "---\n",
        "a: 1\n---\n",
        "---\na: 1\n",
        "a: 1\n...\n",
        "a: 1\n---\nb: 2\n",
        "# c\n",
        "---\n---\n",
        "a: 1\n---\n\n---\nb: 1\n",
        "a: 1\n---\n# only comment\n---\nb: 1\n",
        "---\n...\n---\nb: 1\n",
        "a: 1\n--- # c\nb: 2\n",
        "a: |\n  ---\n  x\n",
    ] {
        accepted(text);
    }
}

#[test]
fn what_it_leaves_to_serde_saphyr() {
    for text in [
        "a: b: c\n",
        "a: 1\na: 2\n",
        "null: 1\n",
        "? a\n: b\n",
        "k: &x 1\nj: *x\n",
        "k: !!str 1\n",
        "%YAML 1.2\n---\na: 1\n",
        "a: >\n  folded\n",
        "a: [1,\n  2]\n",
        "a:\n\t- x\n",
        "a: \"unterminated\n",
        "a: x\n  b: y\n",
        "a: 1\n - b\n",
        "a: x # c\n  y\n",
        "a: \u{1}\n",
        "--- {a: 1}\n",
        // A null document: dropped by serde-saphyr, counted by the quick count.
        "a: 1\n---\n~\n---\nb: 2\n",
    ] {
        assert!(!agree(text), "the fast reader took {text:?}");
    }
}

/// A text of `depth` nested mappings, and the same of sequences.
#[test]
fn deep_nesting_is_left_to_serde_saphyr_before_its_limit() {
    for depth in [10, 59, 60, 61, 64, 65, 70, 200] {
        let mut text = String::new();
        for level in 0..depth {
            text.push_str(&" ".repeat(level * 2));
            text.push_str("a:\n");
        }
        text.push_str(&" ".repeat(depth * 2));
        text.push_str("b: 1\n");
        agree(&text);
        agree(&format!("{}x{}\n", "[".repeat(depth), "]".repeat(depth)));
    }
}

/// One of the strings every generated text draws from: what breaks parsers.
fn tricky_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("null".to_string()),
        Just("~".to_string()),
        Just("yes".to_string()),
        Just("No".to_string()),
        Just("80".to_string()),
        Just("0x1F".to_string()),
        Just("012".to_string()),
        Just("1e3".to_string()),
        Just("-".to_string()),
        Just("- x".to_string()),
        Just("a: b".to_string()),
        Just("a:b".to_string()),
        Just("a #b".to_string()),
        Just("#a".to_string()),
        Just("'q'".to_string()),
        Just("\"q\"".to_string()),
        Just("it's".to_string()),
        Just("back\\slash".to_string()),
        Just("tab\there".to_string()),
        Just("line\nbreak".to_string()),
        Just("two\n\nbreaks\n".to_string()),
        Just(" lead".to_string()),
        Just("trail ".to_string()),
        Just("[x]".to_string()),
        Just("{x}".to_string()),
        Just("x, y".to_string()),
        Just("&a".to_string()),
        Just("*a".to_string()),
        Just("!t".to_string()),
        Just("%p".to_string()),
        Just("@a".to_string()),
        Just("|".to_string()),
        Just(">".to_string()),
        Just("---".to_string()),
        Just("...".to_string()),
        Just("é ü 中".to_string()),
        "[a-z]{1,8}",
        "[a-z0-9 .:/_-]{1,40}",
        "[ -~]{0,12}",
    ]
}

fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        tricky_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((tricky_string(), inner), 0..5)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A small deterministic stream of choices for the emitter.
struct Choices(u64);

impl Choices {
    fn pick(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.pick(n) == 0
    }
}

/// Writes `value` as YAML in styles chosen at random: plain, single-quoted, double-quoted,
/// literal or folded-over-lines scalars; block or flow collections; compact or indented
/// sequences; comments and blank lines. Not every text it writes is valid YAML (a plain
/// string can read as something else, or not at all): both readers must agree on it anyway.
fn emit(value: &Value, choices: &mut Choices) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => emit_mapping(map, 0, choices, &mut out),
        Value::Array(items) if !items.is_empty() => emit_sequence(items, 0, choices, &mut out),
        scalar => {
            out.push_str(&inline(scalar, 0, choices));
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, indent: usize) {
    out.push_str(&" ".repeat(indent));
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A value on the line of its key or dash (a scalar or a flow collection), continuing on lines
/// indented `indent` when it folds.
fn inline(value: &Value, indent: usize, choices: &mut Choices) -> String {
    match value {
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(|v| flow_scalar(v, choices)).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", flow_key(k, choices), flow_scalar(v, choices)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        scalar => {
            let text = scalar_text(scalar);
            let quoted_json = serde_json::to_string(&text).unwrap();
            match choices.pick(6) {
                0 => format!("'{}'", text.replace('\'', "''").replace('\n', "\n\n")),
                1 => quoted_json,
                2 if text.contains(' ') => {
                    // Folded over lines as go-yaml writes long strings.
                    let mut folded = String::new();
                    for (i, word) in text.split(' ').enumerate() {
                        if i > 0 {
                            if choices.one_in(2) {
                                folded.push('\n');
                                pad(&mut folded, indent + 2);
                            } else {
                                folded.push(' ');
                            }
                        }
                        folded.push_str(word);
                    }
                    folded
                }
                3 if text.contains('\n') => {
                    let chomp = ["", "-", "+"][choices.pick(3) as usize];
                    let mut block = format!("|{chomp}\n");
                    for line in text.lines() {
                        if !line.is_empty() {
                            pad(&mut block, indent + 2);
                        }
                        block.push_str(line);
                        block.push('\n');
                    }
                    block.pop();
                    block
                }
                _ => text,
            }
        }
    }
}

fn flow_scalar(value: &Value, choices: &mut Choices) -> String {
    match value {
        Value::Array(_) | Value::Object(_) => inline(value, 0, choices),
        scalar => {
            let text = scalar_text(scalar);
            if choices.one_in(2) {
                serde_json::to_string(&text).unwrap()
            } else {
                text
            }
        }
    }
}

fn flow_key(key: &str, choices: &mut Choices) -> String {
    if choices.one_in(2) {
        serde_json::to_string(key).unwrap()
    } else {
        key.to_string()
    }
}

fn key(key: &str, choices: &mut Choices) -> String {
    match choices.pick(4) {
        0 => serde_json::to_string(key).unwrap(),
        1 => format!("'{}'", key.replace('\'', "''")),
        _ => key.to_string(),
    }
}

fn trailer(choices: &mut Choices, out: &mut String) {
    if choices.one_in(6) {
        out.push_str(" # note");
    }
    out.push('\n');
    if choices.one_in(8) {
        out.push('\n');
    }
    if choices.one_in(10) {
        out.push_str("# a comment line\n");
    }
}

fn emit_mapping(map: &Map<String, Value>, indent: usize, choices: &mut Choices, out: &mut String) {
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            pad(out, indent);
        }
        out.push_str(&key(k, choices));
        out.push(':');
        emit_value_after(v, indent, false, choices, out);
    }
}

fn emit_sequence(items: &[Value], indent: usize, choices: &mut Choices, out: &mut String) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            pad(out, indent);
        }
        out.push('-');
        emit_value_after(item, indent, true, choices, out);
    }
}

/// What follows a key's colon or a dash.
fn emit_value_after(value: &Value, indent: usize, after_dash: bool, choices: &mut Choices, out: &mut String) {
    match value {
        Value::Object(map) if !map.is_empty() && !choices.one_in(5) => {
            if after_dash && choices.one_in(2) {
                out.push(' ');
                emit_mapping(map, indent + 2, choices, out);
            } else {
                let step = if choices.one_in(4) { 4 } else { 2 };
                out.push('\n');
                pad(out, indent + step);
                emit_mapping(map, indent + step, choices, out);
            }
        }
        Value::Array(items) if !items.is_empty() && !choices.one_in(5) => {
            if after_dash && choices.one_in(2) {
                out.push(' ');
                emit_sequence(items, indent + 2, choices, out);
            } else {
                // go-yaml puts a mapping's sequence in the key's column; others indent it.
                let step = if !after_dash && choices.one_in(2) { 0 } else { 2 };
                out.push('\n');
                pad(out, indent + step);
                emit_sequence(items, indent + step, choices, out);
            }
        }
        Value::Null if choices.one_in(2) => trailer(choices, out),
        other => {
            out.push(' ');
            out.push_str(&inline(other, indent, choices));
            trailer(choices, out);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn generated_texts_read_alike(value in any_value(), seed in any::<u64>()) {
        let text = emit(&value, &mut Choices(seed | 1));
        agree(&text);
    }

    #[test]
    fn several_documents_read_alike(values in proptest::collection::vec(any_value(), 1..4), seed in any::<u64>()) {
        let mut choices = Choices(seed | 1);
        let text: Vec<String> = values.iter().map(|v| emit(v, &mut choices)).collect();
        agree(&text.join("---\n"));
    }

    #[test]
    fn mutated_texts_read_alike(
        value in any_value(),
        seed in any::<u64>(),
        at in any::<prop::sample::Index>(),
        cut in 0..4usize,
        insert in "[ -~\n\t]{0,3}",
    ) {
        let text = emit(&value, &mut Choices(seed | 1));
        let mut at = at.index(text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mut end = (at + cut).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        let mutated = format!("{}{insert}{}", &text[..at], &text[end..]);
        agree(&mutated);
    }
}

/// Objects as the API server returns them, written as kubectl writes them: the fast reader
/// takes every one (a kubectl dump never goes to the slow reader).
#[test]
fn kubectl_dumps_are_read_by_the_fast_reader() {
    let pod: Value = serde_json::from_str(include_str!("../../hostport/testdata/full-pod.json")).unwrap();
    let list =
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": [pod]});
    accepted(&portpolicy_cluster_dump::to_yaml(&list));
    let shape = portpolicy_cluster_dump::DumpShape::LARGE.scaled_down(200);
    accepted(&portpolicy_cluster_dump::yaml(shape));
}

/// The differential tests mean something only if the fast reader reads most texts: generated
/// texts it leaves to serde-saphyr (though valid) are the exception.
#[test]
fn the_fast_reader_takes_most_generated_texts() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut accepted, mut valid) = (0, 0);
    for _ in 0..2000 {
        let value = any_value().new_tree(&mut runner).unwrap().current();
        let seed = any::<u64>().new_tree(&mut runner).unwrap().current();
        let text = emit(&value, &mut Choices(seed | 1));
        if reference(&text).is_ok() {
            valid += 1;
            accepted += usize::from(agree(&text));
        }
    }
    assert!(
        accepted * 10 >= valid * 8,
        "the fast reader took {accepted} of {valid} valid texts"
    );
}
