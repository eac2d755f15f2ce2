//! The edge's side of secure aggregation: it answers each stage message of the round it takes part in and masks its
//! update for the sum. A message from the server that the round's state refuses ends this client's part in the
//! round (the server counts it as dropped and removes its mask), never the connection.

use offsite_fed::{prepare_update, LocalOutcome, SecAggClient, SecAggError};
use offsite_protocol::{SecAggMessage, SecAggTask};
use tracing::{debug, info, warn};

/// The reply to a server's stage message, if any.
pub(super) fn answer(state: &mut Option<SecAggClient>, msg: SecAggMessage) -> Option<SecAggMessage> {
    let kind = msg.kind();
    let round = msg.round();
    let none = || SecAggError::Protocol(format!("{kind} with no round open"));
    let reply = match (msg, state.as_mut()) {
        (SecAggMessage::Setup(setup), _) => SecAggClient::new(setup).map(|(client, keys)| {
            *state = Some(client);
            Some(SecAggMessage::Keys(keys))
        }),
        (SecAggMessage::Neighbours(m), Some(c)) => c.share(&m).map(|s| Some(SecAggMessage::Shares(s))),
        (SecAggMessage::Shares(m), Some(c)) => c.receive(&m).map(|()| None),
        (SecAggMessage::Unmask(m), Some(c)) => {
            let reveal = c.reveal(&m);
            *state = None;
            reveal.map(|r| Some(SecAggMessage::Reveal(r)))
        }
        (SecAggMessage::Neighbours(_) | SecAggMessage::Shares(_) | SecAggMessage::Unmask(_), None) => Err(none()),
        (m, _) => Err(SecAggError::Protocol(format!("{} is a client's message", m.kind()))),
    };
    match reply {
        Ok(reply) => {
            debug!(round, kind, "secure-aggregation stage");
            reply
        }
        Err(e) => {
            warn!(round, error = %e, "secure aggregation: leaving this round");
            *state = None;
            None
        }
    }
}

/// The masked update of a securely aggregated task, or `None` (logged) when this client cannot take part.
pub(super) fn masked(
    state: &mut Option<SecAggClient>,
    outcome: &LocalOutcome,
    task: &SecAggTask,
) -> Option<SecAggMessage> {
    let masked = state
        .as_mut()
        .ok_or_else(|| SecAggError::Protocol("no round open".into()))
        .and_then(|c| {
            let (flat, weight) = prepare_update(&outcome.delta, outcome.num_examples, task)?;
            c.mask(&flat, weight)
        });
    match masked {
        Ok((mut m, clipped)) => {
            if clipped > 0 {
                warn!(
                    round = m.round,
                    clipped, "coordinates beyond the secure sum's clip range were clipped"
                );
            }
            info!(round = m.round, weight = m.weight, "update masked for the secure sum");
            m.train_loss = outcome.train_loss;
            Some(SecAggMessage::Masked(m))
        }
        Err(e) => {
            warn!(error = %e, "secure aggregation: this round's update cannot be masked; skipped");
            *state = None;
            None
        }
    }
}
