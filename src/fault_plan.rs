//! The value of `HBMALLOC_CONF=fault:PLAN`: which driver calls the test backend adaptor
//! (`backend::fault::Faulty`) makes fail. Parsed with the rest of the configuration, so it sits
//! below both.

/// A driver call that a plan can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultOp {
    /// `alloc` (`cuMemAlloc`): refused, out of memory.
    Alloc,
    /// `vmm_reserve` (`cuMemAddressReserve`): out of address space.
    Reserve,
    /// `vmm_map` before anything is committed (`cuMemCreate`): out of memory.
    Map,
    /// `vmm_map` half-way: the memory is committed and mapped, then `cuMemSetAccess` fails; the
    /// range is unmapped again before the error returns, as the CUDA backend does.
    Access,
    /// `event_record` (`cuEventCreate`/`cuEventRecord`): out of memory.
    Event,
    /// `synchronize` (`cuCtxSynchronize`): an illegal address reported by queued work.
    Sync,
}

/// Every operation with its name in a plan, in the order `Faulty` counts calls.
pub const OPS: [(FaultOp, &str); 6] = [
    (FaultOp::Alloc, "alloc"),
    (FaultOp::Reserve, "reserve"),
    (FaultOp::Map, "map"),
    (FaultOp::Access, "access"),
    (FaultOp::Event, "event"),
    (FaultOp::Sync, "sync"),
];

impl FaultOp {
    pub fn name(self) -> &'static str {
        OPS.iter().find(|(op, _)| *op == self).map_or("?", |o| o.1)
    }
}

/// Which calls of one operation fail: calls `first..=last` (counted from 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRule {
    pub op: FaultOp,
    pub first: u64,
    pub last: u64,
}

/// A set of rules, parsed from the value of `fault:`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub rules: Vec<FaultRule>,
}

impl FaultPlan {
    /// Parses `RULE[+RULE...]`, a rule being `OP` (every call), `OP@N` (the Nth call), `OP@N..`
    /// (the Nth and every later one) or `OP@N..M`; OP is one of alloc, reserve, map, access,
    /// event, sync. `Err` names what is wrong; an empty value is an error too.
    pub fn parse(text: &str) -> std::result::Result<FaultPlan, String> {
        let mut rules = Vec::new();
        for rule in text.split('+').map(str::trim) {
            let (name, calls) = match rule.split_once('@') {
                Some((name, calls)) => (name, Some(calls)),
                None => (rule, None),
            };
            let op = OPS
                .iter()
                .find(|(_, n)| *n == name)
                .map(|o| o.0)
                .ok_or_else(|| format!("unknown operation '{name}'"))?;
            let (first, last) = match calls {
                None => (1, u64::MAX),
                Some(calls) => parse_calls(calls)
                    .ok_or_else(|| format!("bad call number '{calls}' for '{name}'"))?,
            };
            rules.push(FaultRule { op, first, last });
        }
        Ok(FaultPlan { rules })
    }

    pub fn fails(&self, op: FaultOp, call: u64) -> bool {
        self.rules
            .iter()
            .any(|r| r.op == op && (r.first..=r.last).contains(&call))
    }
}

/// `N`, `N..` or `N..M`, with 1 <= N <= M.
fn parse_calls(text: &str) -> Option<(u64, u64)> {
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
            .filter(|n| *n >= 1)
    };
    match text.split_once("..") {
        None => number(text).map(|n| (n, n)),
        Some((a, "")) => number(a).map(|n| (n, u64::MAX)),
        Some((a, b)) => Some((number(a)?, number(b)?)).filter(|(a, b)| a <= b),
    }
}
