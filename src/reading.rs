//! The reading model shared by every source: SAHOOL's sensor types, their units and aliases,
//! and observation timestamps; and a reading's outbox row, written from a [`Reading`] and read
//! back borrowed as a [`ReadingView`] (one layout, decoded one way).

use std::fmt;

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// SAHOOL's sensor types (`contracts/sahool/sensor_reading.v1.json`), in enum order. The
/// discriminant is stored in the outbox, so variants are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum SensorType {
    SoilMoisture = 0,
    SoilTemperature = 1,
    SoilEc = 2,
    SoilPh = 3,
    AirTemperature = 4,
    AirHumidity = 5,
    WindSpeed = 6,
    WindDirection = 7,
    Rainfall = 8,
    SolarRadiation = 9,
    AtmosphericPressure = 10,
    WaterLevel = 11,
    WaterFlow = 12,
    WaterPressure = 13,
    LeafWetness = 14,
    CanopyTemperature = 15,
}

impl SensorType {
    pub const ALL: [SensorType; 16] = [
        Self::SoilMoisture,
        Self::SoilTemperature,
        Self::SoilEc,
        Self::SoilPh,
        Self::AirTemperature,
        Self::AirHumidity,
        Self::WindSpeed,
        Self::WindDirection,
        Self::Rainfall,
        Self::SolarRadiation,
        Self::AtmosphericPressure,
        Self::WaterLevel,
        Self::WaterFlow,
        Self::WaterPressure,
        Self::LeafWetness,
        Self::CanopyTemperature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SoilMoisture => "soil_moisture",
            Self::SoilTemperature => "soil_temperature",
            Self::SoilEc => "soil_ec",
            Self::SoilPh => "soil_ph",
            Self::AirTemperature => "air_temperature",
            Self::AirHumidity => "air_humidity",
            Self::WindSpeed => "wind_speed",
            Self::WindDirection => "wind_direction",
            Self::Rainfall => "rainfall",
            Self::SolarRadiation => "solar_radiation",
            Self::AtmosphericPressure => "atmospheric_pressure",
            Self::WaterLevel => "water_level",
            Self::WaterFlow => "water_flow",
            Self::WaterPressure => "water_pressure",
            Self::LeafWetness => "leaf_wetness",
            Self::CanopyTemperature => "canopy_temperature",
        }
    }

    pub(crate) fn from_u8(n: u8) -> Option<Self> {
        Self::ALL.get(usize::from(n)).copied()
    }

    /// A canonical name or one of the aliases SAHOOL devices send (`vwc`, `temp`, `ec`, ...),
    /// in any casing.
    pub fn from_name(name: &str) -> Option<Self> {
        let lower = name.trim().to_ascii_lowercase();
        if let Some(t) = Self::ALL.iter().find(|t| t.as_str() == lower) {
            return Some(*t);
        }
        TYPE_ALIASES
            .iter()
            .find(|(_, aliases)| aliases.contains(&lower.as_str()))
            .map(|(t, _)| *t)
    }

    /// SAHOOL's unit for this type: what a reading gets when neither device nor config says.
    pub fn default_unit(self) -> &'static str {
        match self {
            Self::SoilMoisture | Self::AirHumidity | Self::LeafWetness => "%",
            Self::SoilTemperature | Self::AirTemperature | Self::CanopyTemperature => "°C",
            Self::SoilEc => "mS/cm",
            // The platform's normaliser gives pH no unit; the schema allows an empty one.
            Self::SoilPh => "",
            Self::WindSpeed => "m/s",
            Self::WindDirection => "°",
            Self::Rainfall => "mm",
            Self::SolarRadiation => "W/m²",
            Self::AtmosphericPressure => "hPa",
            Self::WaterLevel => "cm",
            Self::WaterFlow => "L/min",
            Self::WaterPressure => "bar",
        }
    }

    /// SAHOOL's plausible range in the default unit; values outside are rejected unless the
    /// sensor's config overrides the range.
    pub fn default_range(self) -> Option<(f64, f64)> {
        Some(match self {
            Self::SoilMoisture | Self::AirHumidity | Self::LeafWetness => (0.0, 100.0),
            Self::SoilTemperature => (-20.0, 60.0),
            Self::AirTemperature | Self::CanopyTemperature => (-50.0, 70.0),
            Self::SoilEc => (0.0, 20.0),
            Self::SoilPh => (0.0, 14.0),
            Self::WindSpeed => (0.0, 100.0),
            Self::WindDirection => (0.0, 360.0),
            Self::Rainfall => (0.0, 500.0),
            Self::SolarRadiation => (0.0, 2000.0),
            Self::AtmosphericPressure => (800.0, 1200.0),
            Self::WaterLevel | Self::WaterFlow | Self::WaterPressure => return None,
        })
    }
}

impl fmt::Display for SensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Spellings devices use for each type, in lower case: every alias of SAHOOL's normaliser
/// (`sensor_type_aliases` in `tests/fixtures/sahool-normalizer.json`), plus a few seen in the
/// field (`soil_water`, `t`, `h`, `irradiance`, ...).
const TYPE_ALIASES: &[(SensorType, &[&str])] = &[
    (
        SensorType::SoilMoisture,
        &[
            "sm",
            "moisture",
            "soil_moist",
            "vwc",
            "soil_humidity",
            "soil_water",
        ],
    ),
    (
        SensorType::SoilTemperature,
        &["soil_temp", "st", "ground_temp", "soiltemp"],
    ),
    (
        SensorType::SoilEc,
        &[
            "ec",
            "conductivity",
            "electrical_conductivity",
            "salinity",
            "soil_conductivity",
        ],
    ),
    (SensorType::SoilPh, &["ph", "acidity"]),
    (
        SensorType::AirTemperature,
        &["temp", "temperature", "air_temp", "at", "t"],
    ),
    (
        SensorType::AirHumidity,
        &["humidity", "rh", "relative_humidity", "air_rh", "h"],
    ),
    (
        SensorType::WindSpeed,
        &["wind", "ws", "wind_velocity", "windspeed"],
    ),
    (SensorType::WindDirection, &["wind_dir", "wd", "winddir"]),
    (SensorType::Rainfall, &["rain", "precipitation", "precip"]),
    (
        SensorType::SolarRadiation,
        &["solar", "radiation", "sr", "light", "irradiance"],
    ),
    (
        SensorType::AtmosphericPressure,
        &["pressure", "atm", "baro", "air_pressure"],
    ),
    (SensorType::WaterLevel, &["level", "wl", "tank_level"]),
    (SensorType::WaterFlow, &["flow", "flow_rate", "wf"]),
    (SensorType::WaterPressure, &["water_press", "wp"]),
    (
        SensorType::LeafWetness,
        &["lw", "leaf_wet", "wetness", "leaf"],
    ),
    (SensorType::CanopyTemperature, &["canopy_temp", "ct"]),
];

/// Types SAHOOL's normaliser knows but the `sensor_reading` schema's enum lacks, with their
/// aliases (lower case). Readings of them are rejected naming the type, never renamed.
const TYPES_OUTSIDE_SCHEMA: &[(&str, &[&str])] =
    &[("water_quality", &["water_quality", "wq", "tds"])];

/// The SAHOOL type a name outside the schema's enum stands for (`tds` → `water_quality`).
pub(crate) fn type_outside_schema(name: &str) -> Option<&'static str> {
    let lower = name.trim().to_ascii_lowercase();
    TYPES_OUTSIDE_SCHEMA
        .iter()
        .find(|(_, names)| names.contains(&lower.as_str()))
        .map(|(t, _)| *t)
}

/// SAHOOL's unit spellings and what devices send for each, in lower case (the spelling itself
/// included): every alias of SAHOOL's normaliser (`unit_aliases`), plus a few seen in the field.
const UNIT_ALIASES: &[(&str, &[&str])] = &[
    ("%", &["%", "percent", "pct", "%rh", "% rh", "%vwc"]),
    ("°C", &["°c", "celsius", "c", "deg_c", "degc"]),
    ("°F", &["°f", "fahrenheit", "f", "deg_f", "degf"]),
    ("mm", &["mm", "millimeter", "millimeters"]),
    ("m/s", &["m/s", "meters_per_second", "mps"]),
    ("km/h", &["km/h", "kilometers_per_hour", "kph"]),
    ("mS/cm", &["ms/cm", "millisiemens", "ms_cm", "ec_unit"]),
    ("µS/cm", &["µs/cm", "us/cm"]),
    ("dS/m", &["ds/m", "decisiemens", "ds_m"]),
    ("lux", &["lux", "lx", "illuminance"]),
    ("W/m²", &["w/m²", "w/m2", "watts_per_m2", "solar_unit"]),
    ("hPa", &["hpa", "hectopascal", "mbar"]),
    ("L/min", &["l/min", "liters_per_minute", "lpm"]),
    ("m³/h", &["m³/h", "m3/h", "cubic_meters_per_hour", "cmh"]),
    ("°", &["°", "deg", "degree", "degrees"]),
];

/// Unit spellings devices use, folded to SAHOOL's in any casing (`percent` → `%`, `KPH` →
/// `km/h`); an unknown unit is kept as sent, trimmed.
pub fn normalize_unit(unit: &str) -> String {
    canonical_unit(unit).to_string()
}

/// [`normalize_unit`] without the copy: SAHOOL's spelling, or `unit` trimmed. ASCII (what
/// devices send) is compared without lowercasing into a new string; anything else is
/// lowercased first, as Unicode folds some letters to ASCII ones.
pub fn canonical_unit(unit: &str) -> &str {
    let trimmed = unit.trim();
    let alias = if trimmed.is_ascii() {
        UNIT_ALIASES
            .iter()
            .find(|(_, aliases)| aliases.iter().any(|a| a.eq_ignore_ascii_case(trimmed)))
    } else {
        let lower = trimmed.to_lowercase();
        UNIT_ALIASES
            .iter()
            .find(|(_, aliases)| aliases.contains(&lower.as_str()))
    };
    alias.map_or(trimmed, |(unit, _)| unit)
}

/// Observation time as nanoseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from_datetime(OffsetDateTime::now_utc())
    }

    pub(crate) fn from_datetime(dt: OffsetDateTime) -> Self {
        // i64 nanoseconds span 1677..2262; parsing rejects anything outside.
        Self(i64::try_from(dt.unix_timestamp_nanos()).unwrap_or(i64::MAX))
    }

    pub fn from_unix_millis(ms: i64) -> Self {
        Self(ms.saturating_mul(1_000_000))
    }

    pub fn unix_millis(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    /// RFC 3339 in UTC with `Z`, fractional digits only as many as needed (0, 3, 6 or 9).
    pub fn to_rfc3339(self) -> String {
        self.rfc3339().as_str().to_string()
    }

    /// As [`Timestamp::to_rfc3339`], without allocating: every event carries two of these.
    pub fn rfc3339(self) -> Rfc3339Text {
        let secs = self.0.div_euclid(1_000_000_000);
        let nanos = self.0.rem_euclid(1_000_000_000) as u32;
        let (days, of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
        let (y, mo, d) = civil_from_days(days);
        let mut out = Rfc3339Text {
            buf: [0; 30],
            len: 0,
        };
        out.digits(y as u32, 4);
        out.push(b'-');
        out.digits(mo, 2);
        out.push(b'-');
        out.digits(d, 2);
        out.push(b'T');
        out.digits(of_day / 3600, 2);
        out.push(b':');
        out.digits(of_day / 60 % 60, 2);
        out.push(b':');
        out.digits(of_day % 60, 2);
        if nanos != 0 {
            out.push(b'.');
            if nanos.is_multiple_of(1_000_000) {
                out.digits(nanos / 1_000_000, 3);
            } else if nanos.is_multiple_of(1_000) {
                out.digits(nanos / 1_000, 6);
            } else {
                out.digits(nanos, 9);
            }
        }
        out.push(b'Z');
        out
    }

    /// Parses RFC 3339 with an offset (`2026-06-01T04:15:00Z`, `...+03:00`).
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let dt = OffsetDateTime::parse(text.trim(), &Rfc3339).ok()?;
        Self::checked(dt)
    }

    /// Parses a local time without offset (`2026-06-01T07:15:00`, Tasmota) at a fixed UTC offset.
    pub(crate) fn parse_local(text: &str, offset: time::UtcOffset) -> Option<Self> {
        let format = time::macros::format_description!(
            version = 2,
            "[year]-[month]-[day][first [T] [ ]][hour]:[minute]:[second][optional [.[subsecond]]]"
        );
        let local = time::PrimitiveDateTime::parse(text.trim(), &format).ok()?;
        Self::checked(local.assume_offset(offset))
    }

    /// Epoch seconds, or milliseconds when the number is too large to be seconds.
    pub(crate) fn from_epoch_number(n: f64) -> Option<Self> {
        if !n.is_finite() || !(0.0..9.2e15).contains(&n) {
            return None;
        }
        // 1e11 seconds is the year 5138: anything larger is milliseconds. The whole and the
        // fractional part are scaled apart so an integral epoch stays exact.
        let (unit, per_unit) = if n >= 1e11 {
            (1_000_000i64, 1e6)
        } else {
            (1_000_000_000i64, 1e9)
        };
        let whole = n.trunc();
        let frac = ((n - whole) * per_unit).round() as i64;
        (whole as i64)
            .checked_mul(unit)?
            .checked_add(frac)
            .map(Self)
    }

    fn checked(dt: OffsetDateTime) -> Option<Self> {
        i64::try_from(dt.unix_timestamp_nanos()).ok().map(Self)
    }
}

/// Year, month and day of a day count since 1970-01-01 in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A formatted RFC 3339 time on the stack (at most `9999-12-31T23:59:59.999999999Z`).
#[derive(Clone, Copy)]
pub struct Rfc3339Text {
    buf: [u8; 30],
    len: u8,
}

impl Rfc3339Text {
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }

    fn push(&mut self, b: u8) {
        self.buf[usize::from(self.len)] = b;
        self.len += 1;
    }

    /// `n` as exactly `width` decimal digits, zero-padded.
    fn digits(&mut self, mut n: u32, width: u8) {
        for i in (0..width).rev() {
            self.buf[usize::from(self.len + i)] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        self.len += width;
    }
}

impl fmt::Display for Rfc3339Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a source measured, mapped to a field: everything the event payload carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub device_id: String,
    pub field_id: String,
    pub tenant_id: String,
    pub sensor_type: SensorType,
    pub value: f64,
    pub unit: String,
    pub observed_at: Timestamp,
    pub battery: Option<f64>,
    pub rssi: Option<i64>,
    pub raw_value: Option<f64>,
    /// The device's own time when the policy replaced it with the receive time.
    pub original_timestamp: Option<Timestamp>,
    /// `observed_at` came from the device (so a repeat of it is a duplicate). Not stored.
    #[serde(skip)]
    pub device_time: bool,
    /// Silence after which this sensor counts as disconnected. Not stored with the reading.
    #[serde(skip)]
    pub stale_after_ms: u64,
    /// The device's own metadata, as JSON object text (bounded, no key of the gateway's), for
    /// the event's `payload.metadata`. Outside the postcard layout: rows that carry it are
    /// [`KIND_READING_META`], so rows of kind 0 written by earlier versions decode unchanged.
    #[serde(skip)]
    pub metadata: Option<String>,
}

/// Kinds of buffered rows (the outbox's `kind` column). [`KIND_READING`] and
/// [`KIND_READING_META`] are readings; [`KIND_STATUS`], [`KIND_RESULT`], [`KIND_HEARTBEAT`] and
/// [`KIND_CONFIG`] are events about them, about commands and about the gateway, outside the readings' totals
/// (see [`is_reading_kind`]).
pub const KIND_READING: u8 = 0;
pub(crate) const KIND_STATUS: u8 = 1;
/// A reading with device metadata: the [`KIND_READING`] body followed by the metadata's JSON
/// object text.
pub(crate) const KIND_READING_META: u8 = 2;
/// A command's result (`body`: the store's `ResultBody` as JSON), with a stored event id.
pub(crate) const KIND_RESULT: u8 = 3;
/// The gateway's heartbeat (`body`: the event's payload as JSON, see `fleet::heartbeat`).
pub(crate) const KIND_HEARTBEAT: u8 = 4;
/// A remote config outcome (`body` as a heartbeat's, see `fleet::remote`).
pub(crate) const KIND_CONFIG: u8 = 5;

/// Whether rows of this kind are readings, counted in `accepted = forwarded + dropped +
/// refused + buffered`. An unknown kind counts as one, as every kind but status did before.
pub(crate) fn is_reading_kind(kind: i64) -> bool {
    ![KIND_STATUS, KIND_RESULT, KIND_HEARTBEAT, KIND_CONFIG]
        .iter()
        .any(|&k| i64::from(k) == kind)
}

/// Why a buffered reading's body does not decode.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Postcard(#[from] postcard::Error),
    #[error("its device metadata is not a JSON object")]
    Metadata,
    #[error("kind {0} is not a reading")]
    Kind(u8),
}

/// Room on the stack for a reading's row body before its metadata; a longer one (long ids)
/// is written into a growing `Vec` instead.
const ROW_SCRATCH: usize = 512;

impl Reading {
    /// The outbox row kind and body of this reading.
    pub fn to_row(&self) -> (u8, Vec<u8>) {
        let meta = self.metadata.as_deref().unwrap_or_default();
        // Written on the stack first, so the body is allocated once at its size instead of
        // grown a few bytes at a time.
        let mut scratch = [0u8; ROW_SCRATCH];
        let mut body = match postcard::to_slice(self, &mut scratch) {
            Ok(used) => {
                let mut body = Vec::with_capacity(used.len() + meta.len());
                body.extend_from_slice(used);
                body
            }
            // Only for want of room: serializing strings and numbers cannot fail otherwise.
            Err(_) => postcard::to_stdvec(self).unwrap_or_default(),
        };
        body.extend_from_slice(meta.as_bytes());
        let kind = match self.metadata {
            None => KIND_READING,
            Some(_) => KIND_READING_META,
        };
        (kind, body)
    }

    /// A reading from its outbox row, of either reading kind.
    pub fn from_row(kind: u8, body: &[u8]) -> Result<Self, BodyError> {
        ReadingView::from_row(kind, body).map(|v| v.to_owned())
    }
}

/// A buffered reading borrowed from its row: what an event is rendered from, without a copy
/// of every string per publish. Its fields are [`Reading`]'s stored ones in the same order (the
/// postcard layout), so [`Reading::from_row`] decodes through it and its tests hold for both.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct ReadingView<'a> {
    pub device_id: &'a str,
    pub field_id: &'a str,
    pub tenant_id: &'a str,
    pub sensor_type: SensorType,
    pub value: f64,
    pub unit: &'a str,
    pub observed_at: Timestamp,
    pub battery: Option<f64>,
    pub rssi: Option<i64>,
    pub raw_value: Option<f64>,
    pub original_timestamp: Option<Timestamp>,
    /// [`Reading::metadata`]: after the postcard part in rows of [`KIND_READING_META`].
    #[serde(skip)]
    pub metadata: Option<&'a str>,
}

impl<'a> ReadingView<'a> {
    /// The reading in an outbox row of either reading kind, borrowing its strings.
    pub fn from_row(kind: u8, body: &'a [u8]) -> Result<Self, BodyError> {
        match kind {
            KIND_READING => Ok(postcard::from_bytes(body)?),
            KIND_READING_META => {
                let (mut r, meta): (Self, _) = postcard::take_from_bytes(body)?;
                let text = std::str::from_utf8(meta).map_err(|_| BodyError::Metadata)?;
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
                    .map_err(|_| BodyError::Metadata)?;
                r.metadata = Some(text);
                Ok(r)
            }
            kind => Err(BodyError::Kind(kind)),
        }
    }

    /// The owned reading; what is not stored (`device_time`, `stale_after_ms`) is zero.
    pub fn to_owned(&self) -> Reading {
        Reading {
            device_id: self.device_id.to_string(),
            field_id: self.field_id.to_string(),
            tenant_id: self.tenant_id.to_string(),
            sensor_type: self.sensor_type,
            value: self.value,
            unit: self.unit.to_string(),
            observed_at: self.observed_at,
            battery: self.battery,
            rssi: self.rssi,
            raw_value: self.raw_value,
            original_timestamp: self.original_timestamp,
            device_time: false,
            stale_after_ms: 0,
            metadata: self.metadata.map(str::to_string),
        }
    }
}

/// A sensor's liveness, as `device_status.v1.json` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SensorStatus {
    /// Reported for the first time, or again after being stale (`sensor.connected`).
    Online,
    /// Silent for longer than its stale timeout (`sensor.disconnected`).
    Offline,
    /// Battery fell below the threshold (flagged once per crossing).
    LowBattery,
}

/// A change of a sensor's liveness, buffered and forwarded like a reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusChange {
    pub device_id: String,
    pub field_id: String,
    pub tenant_id: String,
    pub sensor_type: SensorType,
    pub status: SensorStatus,
    pub(crate) last_seen: Timestamp,
    pub battery: Option<f64>,
    pub rssi: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_fold_to_sahool_types() {
        assert_eq!(SensorType::from_name("vwc"), Some(SensorType::SoilMoisture));
        assert_eq!(
            SensorType::from_name("temp"),
            Some(SensorType::AirTemperature)
        );
        assert_eq!(SensorType::from_name("ec"), Some(SensorType::SoilEc));
        assert_eq!(
            SensorType::from_name("soil_temp"),
            Some(SensorType::SoilTemperature)
        );
        assert_eq!(
            SensorType::from_name("Soil_Moisture"),
            Some(SensorType::SoilMoisture)
        );
        assert_eq!(SensorType::from_name("nitrogen"), None);
        for t in SensorType::ALL {
            assert_eq!(SensorType::from_u8(t as u8), Some(t));
            assert_eq!(SensorType::from_name(t.as_str()), Some(t));
        }
    }

    #[test]
    fn units_fold() {
        assert_eq!(normalize_unit("percent"), "%");
        assert_eq!(normalize_unit("C"), "°C");
        assert_eq!(normalize_unit("mS/cm"), "mS/cm");
        assert_eq!(normalize_unit(" KPH "), "km/h");
        assert_eq!(normalize_unit("kPa"), "kPa");
        assert_eq!(normalize_unit(" odd unit "), "odd unit");
        // Non-ASCII is lowercased as Unicode does: the Kelvin sign folds to `k`, `°C` to `°c`.
        assert_eq!(normalize_unit("\u{212A}PH"), "km/h");
        assert_eq!(normalize_unit(" °C"), "°C");
        assert_eq!(normalize_unit("µS/CM"), "µS/cm");
        // Folds exactly as lowercasing every unit first would.
        let lowercased = |u: &str| {
            let lower = u.trim().to_lowercase();
            UNIT_ALIASES
                .iter()
                .find(|(_, aliases)| aliases.contains(&lower.as_str()))
                .map_or(u.trim().to_string(), |(unit, _)| unit.to_string())
        };
        for (unit, aliases) in UNIT_ALIASES {
            for a in *aliases {
                for spelled in [
                    a.to_string(),
                    format!(" {} ", a.to_uppercase()),
                    unit.to_string(),
                ] {
                    assert_eq!(normalize_unit(&spelled), lowercased(&spelled), "{spelled}");
                }
            }
            assert!(aliases.contains(&unit.to_lowercase().as_str()), "{unit}");
            assert!(aliases.iter().all(|a| *a == a.to_lowercase()), "{unit}");
        }
        for (t, aliases) in TYPE_ALIASES {
            for a in *aliases {
                assert_eq!(SensorType::from_name(a), Some(*t), "{a}");
            }
        }
        assert_eq!(type_outside_schema(" TDS"), Some("water_quality"));
        assert_eq!(SensorType::from_name("wq"), None);
    }

    fn reading() -> Reading {
        Reading {
            device_id: "probe-1".into(),
            field_id: "field-1".into(),
            tenant_id: "tenant-a".into(),
            sensor_type: SensorType::SoilEc,
            value: 1.25,
            unit: "mS/cm".into(),
            observed_at: Timestamp(1_780_287_300_000_000_000),
            battery: Some(87.5),
            rssi: Some(-71),
            raw_value: None,
            original_timestamp: None,
            device_time: false,
            stale_after_ms: 0,
            metadata: None,
        }
    }

    /// A buffered row of kind 0 written by a version before device metadata existed: the exact
    /// bytes of [`reading`] in that layout.
    const OLD_BODY: &[u8] = &[
        7, b'p', b'r', b'o', b'b', b'e', b'-', b'1', 7, b'f', b'i', b'e', b'l', b'd', b'-', b'1',
        8, b't', b'e', b'n', b'a', b'n', b't', b'-', b'a', 2, 0, 0, 0, 0, 0, 0, 244, 63, 5, b'm',
        b'S', b'/', b'c', b'm', 128, 160, 157, 170, 190, 247, 236, 180, 49, 1, 0, 0, 0, 0, 0, 224,
        85, 64, 1, 141, 1, 0, 0,
    ];

    #[test]
    fn rows_of_the_previous_layout_still_decode() {
        assert_eq!(
            Reading::from_row(KIND_READING, OLD_BODY).unwrap(),
            reading()
        );
        assert_eq!(reading().to_row(), (KIND_READING, OLD_BODY.to_vec()));
    }

    #[test]
    fn a_row_too_long_for_the_scratch_space_is_written_whole() {
        let mut long = reading();
        long.device_id = "d".repeat(ROW_SCRATCH);
        long.metadata = Some(r#"{"fw":"1.2"}"#.into());
        let (kind, body) = long.to_row();
        assert_eq!(kind, KIND_READING_META);
        assert!(body.len() > ROW_SCRATCH);
        assert_eq!(Reading::from_row(kind, &body).unwrap(), long);
    }

    #[test]
    fn device_metadata_rides_in_rows_of_its_own_kind() {
        let mut r = reading();
        r.metadata = Some(r#"{"fw":"1.2","slot":[1,2]}"#.into());
        let (kind, body) = r.to_row();
        assert_eq!(kind, KIND_READING_META);
        assert!(
            body.starts_with(OLD_BODY),
            "the kind-0 layout, then the metadata"
        );
        assert_eq!(Reading::from_row(kind, &body).unwrap(), r);
        let mut bad = OLD_BODY.to_vec();
        bad.extend_from_slice(b"[1]");
        assert!(matches!(
            Reading::from_row(KIND_READING_META, &bad),
            Err(BodyError::Metadata)
        ));
        assert!(matches!(
            Reading::from_row(KIND_STATUS, OLD_BODY),
            Err(BodyError::Kind(KIND_STATUS))
        ));
    }

    #[test]
    fn rfc3339_matches_the_time_crate_over_the_whole_range() {
        let reference = |t: Timestamp| {
            let dt = OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0)).unwrap();
            let nanos = dt.nanosecond();
            let frac = if nanos == 0 {
                String::new()
            } else if nanos.is_multiple_of(1_000_000) {
                format!(".{:03}", nanos / 1_000_000)
            } else if nanos.is_multiple_of(1_000) {
                format!(".{:06}", nanos / 1_000)
            } else {
                format!(".{nanos:09}")
            };
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{frac}Z",
                dt.year(),
                u8::from(dt.month()),
                dt.day(),
                dt.hour(),
                dt.minute(),
                dt.second()
            )
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut samples = vec![i64::MIN, i64::MAX, 0, -1, 1, 951_782_400_000_000_000];
        for _ in 0..20_000 {
            // xorshift: spread over the whole i64 range, then rounded to ms and µs and s.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = x as i64;
            samples.extend([
                n,
                n / 1_000_000 * 1_000_000,
                n / 1_000 * 1_000,
                n / 1_000_000_000 * 1_000_000_000,
            ]);
        }
        for n in samples {
            assert_eq!(Timestamp(n).to_rfc3339(), reference(Timestamp(n)), "{n}");
        }
    }

    #[test]
    fn timestamps_round_trip_with_minimal_fraction() {
        let t = Timestamp::parse_rfc3339("2026-06-01T04:15:00.123456Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-06-01T04:15:00.123456Z");
        let t = Timestamp::parse_rfc3339("2026-06-01T07:15:00+03:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-06-01T04:15:00Z");
        assert_eq!(
            Timestamp::from_epoch_number(1780287300.0)
                .unwrap()
                .to_rfc3339(),
            "2026-06-01T04:15:00Z"
        );
        assert_eq!(
            Timestamp::from_epoch_number(1780287300123.0)
                .unwrap()
                .to_rfc3339(),
            "2026-06-01T04:15:00.123Z"
        );
        let offset = time::UtcOffset::from_hms(3, 0, 0).unwrap();
        assert_eq!(
            Timestamp::parse_local("2026-06-01T07:15:00", offset)
                .unwrap()
                .to_rfc3339(),
            "2026-06-01T04:15:00Z"
        );
        assert!(Timestamp::parse_rfc3339("yesterday").is_none());
        assert!(Timestamp::from_epoch_number(f64::NAN).is_none());
    }
}
