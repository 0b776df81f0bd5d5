//! When a failed attempt is tried again.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exponential backoff between the attempts of an invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Wait before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Each wait is this many times the one before.
    pub exponentiation_factor: f64,
    /// No wait is longer than this.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Attempts in all; `None` retries for ever.
    pub max_attempts: Option<u32>,
    /// What happens after the last attempt.
    pub on_max_attempts: OnMaxAttempts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnMaxAttempts {
    /// Complete the invocation as failed, with the last attempt's error.
    #[serde(alias = "kill")]
    Fail,
    /// Pause the invocation: it keeps its key until an operator resumes or kills it.
    Pause,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_interval: Duration::from_millis(50),
            exponentiation_factor: 2.0,
            max_interval: Duration::from_secs(10),
            max_attempts: None,
            on_max_attempts: OnMaxAttempts::Fail,
        }
    }
}

impl RetryPolicy {
    /// The wait after `failed` attempts have failed, or `None` when there is no
    /// attempt left.
    pub fn delay_after(&self, failed: u32) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| failed >= max) {
            return None;
        }
        let exponent = failed.saturating_sub(1).min(64) as i32;
        let delay = self.initial_interval.as_secs_f64() * self.exponentiation_factor.powi(exponent);
        Some(Duration::from_secs_f64(delay.min(self.max_interval.as_secs_f64())))
    }

    /// Checks the values, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let factor = self.exponentiation_factor;
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(format!("exponentiation-factor must be at least 1, not {factor}"));
        }
        if self.max_attempts == Some(0) {
            return Err("max-attempts must be at least 1".to_owned());
        }
        if self.max_interval < self.initial_interval {
            return Err("max-interval must not be below initial-interval".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_maximum_and_stop_after_the_last_attempt() {
        let policy = RetryPolicy {
            initial_interval: Duration::from_millis(100),
            exponentiation_factor: 3.0,
            max_interval: Duration::from_secs(1),
            max_attempts: Some(5),
            on_max_attempts: OnMaxAttempts::Fail,
        };
        let delays: Vec<_> = (1..=5).map(|n| policy.delay_after(n).map(|d| d.as_millis())).collect();
        assert_eq!(delays, vec![Some(100), Some(300), Some(900), Some(1000), None]);
        assert!(RetryPolicy { max_attempts: None, ..policy.clone() }.delay_after(1_000).is_some());
        assert!(RetryPolicy { exponentiation_factor: 0.5, ..policy }.validate().is_err());
    }
}
