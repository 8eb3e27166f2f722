//! Forking (claim 7): with the selection strategy `all`, the call inquires of every healthy
//! server for the service at once (the inquiry starts one leg each); every
//! 2xx is relayed to the terminal with its own To tag and becomes a session of its own when
//! the terminal ACKs it. Servers that refuse do not fail the request while another succeeds;
//! when all refuse, the terminal gets the best final response (RFC 3261 §16.7 step 6), and a
//! fork timeout cancels legs still pending.

use rsip::Response;

/// How good a final response is for the terminal, lower is better (RFC 3261 §16.7 step 6):
/// any 6xx first; then the lowest class, 4xx before 5xx; within a class an actual response
/// before a locally generated timeout, then the lowest code.
fn rank(code: u16, has_response: bool) -> (u8, u8, u16) {
    let class = match code {
        600..=699 => 0,
        400..=499 => 1,
        500..=599 => 2,
        300..=399 => 3,
        _ => 4,
    };
    // 408 without a response is our own timeout: the least informative answer.
    let local = if code == 408 && !has_response { 1 } else { 0 };
    (class, local, code)
}

/// The best of the final failures the forked legs got, per RFC 3261 §16.7.
pub fn best_response(failures: &[(u16, Option<Response>)]) -> Option<(u16, Option<Response>)> {
    failures
        .iter()
        .min_by_key(|(code, resp)| rank(*code, resp.is_some()))
        .cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn resp(code: u16) -> Option<Response> {
        Some(Response {
            status_code: sip_core::message::status(code, None),
            ..Response::default()
        })
    }

    #[test]
    fn a_6xx_wins_over_everything() {
        let best = best_response(&[(486, resp(486)), (603, resp(603)), (500, resp(500))]).unwrap();
        assert_eq!(best.0, 603);
    }

    #[test]
    fn a_4xx_wins_over_a_5xx_and_a_lower_code_within_the_class() {
        let best = best_response(&[(503, resp(503)), (486, resp(486)), (480, resp(480))]).unwrap();
        assert_eq!(best.0, 480);
    }

    #[test]
    fn a_real_answer_wins_over_our_own_timeout() {
        let best = best_response(&[(408, None), (486, resp(486))]).unwrap();
        assert_eq!(best.0, 486);
        let best = best_response(&[(408, None), (408, resp(408))]).unwrap();
        assert!(best.1.is_some());
    }

    #[test]
    fn nothing_to_choose_from() {
        assert!(best_response(&[]).is_none());
    }
}
