//! Points → read requests. Points of one (unit, kind) are sorted by register and merged into
//! one request while the next point starts at most [`MAX_GAP`] registers after the covered
//! range and the request stays within [`MAX_REGISTERS`]. Reading a few unused registers costs
//! far less on a 9600-baud bus than another request/response turnaround.
//!
//! Invariants (checked by property tests): every point is in exactly one request, as one slot
//! whose registers lie inside that request; requests hold 1..=125 registers and never run past
//! register 65535; unit and kind of a slot are those of its request.

use super::{Point, PointId, RegisterKind, ValueType, WordOrder, MAX_UNIT};

/// Unused registers a request may span between two points.
pub(crate) const MAX_GAP: u16 = 8;
/// Registers one read may return (Modbus limit for functions 0x03 and 0x04).
pub(crate) const MAX_REGISTERS: u16 = 125;

/// One read of `count` registers from `start` on one slave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    pub unit: u8,
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
    pub(crate) slots: Vec<Slot>,
}

/// Where a point's value sits in its request's registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub id: PointId,
    /// Index of the value's first register in the response.
    pub offset: u16,
    pub value_type: ValueType,
    pub word_order: WordOrder,
}

/// The requests of one poll cycle, in the order they go on the bus (by unit, kind, register).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub requests: Vec<ReadRequest>,
}

impl Plan {
    /// Points in the plan.
    pub fn len(&self) -> usize {
        self.requests.iter().map(|r| r.slots.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    #[error("point {id}: unit {unit} is outside 1..=247")]
    Unit { id: PointId, unit: u8 },
    #[error(
        "point {id}: a {width}-register value at register {register} runs past register 65535"
    )]
    Register {
        id: PointId,
        register: u16,
        width: u16,
    },
}

impl Point {
    /// Whether the point can be read at all; config parsing can report this per sensor.
    pub fn check(&self) -> Result<(), PointError> {
        if self.unit == 0 || self.unit > MAX_UNIT {
            return Err(PointError::Unit {
                id: self.id,
                unit: self.unit,
            });
        }
        let width = self.value_type.registers();
        if u32::from(self.register) + u32::from(width) > 0x1_0000 {
            return Err(PointError::Register {
                id: self.id,
                register: self.register,
                width,
            });
        }
        Ok(())
    }

    /// One past the point's last register (fits in u32 for any register).
    fn end(&self) -> u32 {
        u32::from(self.register) + u32::from(self.value_type.registers())
    }
}

/// The requests that read every point once. Fails on the first point that cannot be read.
pub fn plan(points: &[Point]) -> Result<Plan, PointError> {
    for p in points {
        p.check()?;
    }
    let mut sorted: Vec<&Point> = points.iter().collect();
    sorted.sort_by_key(|p| (p.unit, p.kind, p.register, p.id));

    let mut requests: Vec<ReadRequest> = Vec::new();
    let mut open: Option<(ReadRequest, u32)> = None; // the request being grown and its end
    for p in sorted {
        if let Some((req, end)) = &mut open {
            let same_slave = req.unit == p.unit && req.kind == p.kind;
            let near = u32::from(p.register) <= *end + u32::from(MAX_GAP);
            let new_end = (*end).max(p.end());
            if same_slave && near && new_end - u32::from(req.start) <= u32::from(MAX_REGISTERS) {
                *end = new_end;
                req.slots.push(slot(p, req.start));
                continue;
            }
        }
        if let Some((req, end)) = open.take() {
            requests.push(finish(req, end));
        }
        open = Some((
            ReadRequest {
                unit: p.unit,
                kind: p.kind,
                start: p.register,
                count: 0,
                slots: vec![slot(p, p.register)],
            },
            p.end(),
        ));
    }
    if let Some((req, end)) = open {
        requests.push(finish(req, end));
    }
    Ok(Plan { requests })
}

fn slot(p: &Point, start: u16) -> Slot {
    Slot {
        id: p.id,
        offset: p.register - start,
        value_type: p.value_type,
        word_order: p.word_order,
    }
}

fn finish(mut req: ReadRequest, end: u32) -> ReadRequest {
    // `end - start` ≤ MAX_REGISTERS by construction, so it fits in u16.
    req.count = u16::try_from(end - u32::from(req.start)).unwrap_or(MAX_REGISTERS);
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(id: PointId, unit: u8, kind: RegisterKind, register: u16, t: ValueType) -> Point {
        Point {
            id,
            unit,
            kind,
            register,
            value_type: t,
            word_order: WordOrder::Big,
        }
    }

    #[test]
    fn nearby_registers_of_one_slave_share_a_request() {
        use RegisterKind::*;
        use ValueType::*;
        let points = [
            point(0, 3, Holding, 0, U16),
            point(1, 3, Holding, 1, I16),
            point(2, 3, Holding, 10, F32), // gap of 8 after register 1: merged
            point(3, 3, Holding, 30, U16), // gap of 18: new request
            point(4, 3, Input, 0, U16),    // other kind
            point(5, 4, Holding, 0, U16),  // other unit
        ];
        let plan = plan(&points).unwrap();
        let shape: Vec<_> = plan
            .requests
            .iter()
            .map(|r| (r.unit, r.kind, r.start, r.count, r.slots.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (3, Holding, 0, 12, 3),
                (3, Holding, 30, 1, 1),
                (3, Input, 0, 1, 1),
                (4, Holding, 0, 1, 1),
            ]
        );
        assert_eq!(plan.requests[0].slots[2].offset, 10);
    }

    #[test]
    fn a_gap_of_nine_splits() {
        let points = [
            point(0, 1, RegisterKind::Holding, 0, ValueType::U16),
            point(1, 1, RegisterKind::Holding, 10, ValueType::U16),
        ];
        assert_eq!(plan(&points).unwrap().requests.len(), 2);
    }

    #[test]
    fn requests_stop_at_125_registers() {
        let points: Vec<Point> = (0..130)
            .map(|i| point(i, 1, RegisterKind::Input, i as u16, ValueType::U16))
            .collect();
        let plan = plan(&points).unwrap();
        let counts: Vec<u16> = plan.requests.iter().map(|r| r.count).collect();
        assert_eq!(counts, vec![125, 5]);
    }

    #[test]
    fn unreadable_points_are_refused() {
        let bad_unit = point(7, 0, RegisterKind::Holding, 0, ValueType::U16);
        assert_eq!(plan(&[bad_unit]), Err(PointError::Unit { id: 7, unit: 0 }));
        let high = point(8, 248, RegisterKind::Holding, 0, ValueType::U16);
        assert!(plan(&[high]).is_err());
        let past_end = point(9, 1, RegisterKind::Holding, 65535, ValueType::U32);
        assert!(matches!(
            plan(&[past_end]),
            Err(PointError::Register { id: 9, .. })
        ));
        let last = point(10, 1, RegisterKind::Holding, 65534, ValueType::F32);
        assert_eq!(plan(&[last]).unwrap().requests[0].count, 2);
    }

    fn any_point() -> impl Strategy<Value = Point> {
        (
            1u8..=6,
            prop_oneof![Just(RegisterKind::Holding), Just(RegisterKind::Input)],
            // Mostly clustered registers, some near the top of the address space.
            prop_oneof![0u16..300, 65_400u16..=65_534],
            prop_oneof![
                Just(ValueType::U16),
                Just(ValueType::I16),
                Just(ValueType::U32),
                Just(ValueType::I32),
                Just(ValueType::F32)
            ],
        )
            .prop_map(|(unit, kind, register, value_type)| Point {
                id: 0,
                unit,
                kind,
                register,
                value_type,
                word_order: WordOrder::Little,
            })
    }

    proptest! {
        #[test]
        fn every_point_is_read_exactly_once_within_limits(
            raw in proptest::collection::vec(any_point(), 0..200)
        ) {
            let points: Vec<Point> = raw
                .into_iter()
                .enumerate()
                .map(|(id, p)| Point { id, ..p })
                .collect();
            let plan = plan(&points).unwrap();
            let mut seen = vec![0usize; points.len()];
            for r in &plan.requests {
                prop_assert!(r.count >= 1 && r.count <= MAX_REGISTERS);
                prop_assert!(u32::from(r.start) + u32::from(r.count) <= 0x1_0000);
                for s in &r.slots {
                    let p = &points[s.id];
                    seen[s.id] += 1;
                    prop_assert_eq!((p.unit, p.kind), (r.unit, r.kind));
                    prop_assert_eq!(u32::from(r.start) + u32::from(s.offset), u32::from(p.register));
                    prop_assert!(s.offset + s.value_type.registers() <= r.count);
                    prop_assert_eq!(s.value_type, p.value_type);
                    prop_assert_eq!(s.word_order, p.word_order);
                }
            }
            prop_assert!(seen.iter().all(|&n| n == 1), "coverage {:?}", seen);
            prop_assert_eq!(plan.len(), points.len());
        }

        #[test]
        fn neighbours_within_the_gap_are_merged(
            start in 0u16..1000,
            gaps in proptest::collection::vec(0u16..=MAX_GAP, 1..20)
        ) {
            // u16 points separated by gaps ≤ MAX_GAP, spanning less than 125 registers: one read.
            let mut register = start;
            let mut points = vec![point(0, 1, RegisterKind::Holding, register, ValueType::U16)];
            for (i, g) in gaps.iter().enumerate() {
                register += g + 1;
                points.push(point(i + 1, 1, RegisterKind::Holding, register, ValueType::U16));
            }
            let span = register - start + 1;
            let plan = plan(&points).unwrap();
            if span <= MAX_REGISTERS {
                prop_assert_eq!(plan.requests.len(), 1);
                prop_assert_eq!(plan.requests[0].count, span);
            } else {
                prop_assert!(plan.requests.len() > 1);
            }
        }
    }
}
