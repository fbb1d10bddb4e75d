//! Rule: the datapath fits Linux 5.10's stack. That kernel counts the stack of a chain of calls
//! together against 512 bytes, each frame rounded up to 32 (and at least 32). An entry point that
//! calls a helper-like subprogram (memset, memmove) makes entry + 32; an entry point that is only
//! a wrapper around its body (a function of its own) makes 32 + body + 32. So an entry point may
//! use at most 480 bytes, any other function 448. The kernel matrix boots 5.10 to prove it; this
//! reads the compiled object on any host, so a change that grows a frame fails here first.

use std::collections::BTreeMap;

/// The most a function's frame may use (see the module documentation): an entry point, any other.
const MAX_ENTRY_FRAME: i32 = 480;
const MAX_FRAME: i32 = 448;

/// The deepest stack slot each function of the object touches (bytes below its frame pointer).
fn frames() -> BTreeMap<String, i32> {
    let obj = aya_obj::Object::parse(lb_agent::datapath::LB_OBJECT).expect("the datapath object parses");
    let mut out = BTreeMap::new();
    for f in obj.functions.values() {
        let depth = f
            .instructions
            .iter()
            .filter_map(|i| {
                // Loads (LDX) address through their source register, stores (ST, STX) through
                // their destination; r10 is the frame pointer.
                let class = i.code & 0x07;
                let reg = match class {
                    0x01 => i.src_reg(),
                    0x02 | 0x03 => i.dst_reg(),
                    _ => return None,
                };
                (reg == 10 && i.off < 0).then(|| -i32::from(i.off))
            })
            .max()
            .unwrap_or(0);
        let e = out.entry(f.name.clone()).or_insert(0);
        *e = (*e).max(depth);
    }
    out
}

#[test]
fn every_function_fits_the_stack_of_linux_5_10() {
    let frames = frames();
    // The test reads what it means to: the node-side ingress program's body is there, and deep.
    let node_in = frames.iter().find(|(n, _)| n.contains("lb4_tc_node_in") && **n != "lb4_tc_node_in");
    assert!(node_in.is_some_and(|(_, d)| *d > 256), "the node-side program's body: {frames:#?}");
    let obj = aya_obj::Object::parse(lb_agent::datapath::LB_OBJECT).expect("the datapath object parses");
    let entry = |name: &str| obj.programs.contains_key(name);
    assert!(entry("lb6_tc_forward") && !entry("memset"), "entry points are told from the rest");
    let limit = |name: &str| if entry(name) { MAX_ENTRY_FRAME } else { MAX_FRAME };
    let over: Vec<_> = frames.iter().filter(|(n, d)| **d > limit(n)).collect();
    assert!(
        over.is_empty(),
        "frames over {MAX_ENTRY_FRAME} bytes (entry points) or {MAX_FRAME} (others): Linux 5.10 would refuse \
         them: {over:#?}"
    );
}
