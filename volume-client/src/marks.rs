//! Snapshot cuts across the replicas: pause, mark, resume, and reads and change lists at a mark.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;

use blockfleet_proto::wire::{ChunkInfo, Request, Response};

use crate::*;

impl ReplicatedVolume {
    /// Pauses every replica; needs a majority (then every write waits: each waits for all).
    /// On failure resumes those paused.
    pub async fn pause(&self) -> Result<(), ClientError> {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::Pause {
            volume: self.volume.clone(),
        };
        let results = self.send(&targets, &req).await;
        let ok = results.iter().filter(|(_, _, r)| r.is_ok()).count();
        if ok >= self.quorum() {
            return Ok(());
        }
        self.resume().await;
        match results.into_iter().find_map(|(_, _, r)| r.err()) {
            Some(e) if !replica_fault(&e) => Err(e),
            _ => Err(self.quorum_error(ok, "could not pause a majority")),
        }
    }

    /// Resumes every replica (best effort: a pause also times out by itself).
    pub async fn resume(&self) {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::Resume {
            volume: self.volume.clone(),
        };
        let _ = self.send(&targets, &req).await;
    }

    /// Takes mark `id` on every paused replica and resumes it; needs a majority marked.
    pub async fn mark_resume(&self, id: u64) -> Result<u64, ClientError> {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::MarkResume {
            volume: self.volume.clone(),
            id,
        };
        let results = self.send(&targets, &req).await;
        let ok = results
            .iter()
            .filter(|(_, _, r)| matches!(r, Ok(Response::MarkId(m)) if *m == id))
            .count();
        if ok >= self.quorum() {
            return Ok(id);
        }
        self.release_mark(id).await;
        match results.into_iter().find_map(|(_, _, r)| r.err()) {
            Some(e) if !replica_fault(&e) => Err(e),
            _ => Err(self.quorum_error(ok, "could not mark a majority")),
        }
    }

    /// Pause, mark `id`, resume (resumed whatever the mark did).
    pub async fn take_mark(&self, id: u64) -> Result<u64, ClientError> {
        self.pause().await?;
        self.mark_resume(id).await
    }

    pub async fn release_mark(&self, mark: u64) {
        let targets = self.members_in(&[Health::InSync, Health::Repairing]);
        let req = Request::ReleaseMark {
            volume: self.volume.clone(),
            mark,
        };
        let _ = self.send(&targets, &req).await;
        let mut mv = self.mark_versions.lock().unwrap_or_else(|p| p.into_inner());
        if mv.as_ref().is_some_and(|(m, _)| *m == mark) {
            *mv = None;
        }
    }

    /// Chunks changed between marks on any replica holding `target` (a union: a replica
    /// that cannot say for itself makes the list longer, never shorter).
    pub async fn list_changed_chunks(
        &self,
        base: u64,
        target: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let targets = self.members_in(&[Health::InSync]);
        let req = Request::ListChangedChunks {
            volume: self.volume.clone(),
            base,
            target,
        };
        let mut all = BTreeSet::new();
        let mut answered = 0;
        let mut refusal = None;
        for (_, _, r) in self.send(&targets, &req).await {
            match r {
                Ok(Response::Chunks(c)) => {
                    answered += 1;
                    all.extend(c);
                }
                Ok(_) => return Err(unexpected("ListChangedChunks")),
                Err(e) => refusal = Some(e),
            }
        }
        // A majority, for the same reason as `versions_at`.
        match (answered, refusal) {
            (0, Some(e)) if !replica_fault(&e) => Err(e),
            (n, _) if n < self.quorum() => {
                Err(self.quorum_error(n, "too few replicas listed their changes"))
            }
            _ => Ok(all.into_iter().collect()),
        }
    }

    /// Versions at `mark` of every replica holding it (fetched once per mark).
    pub(crate) async fn versions_at(&self, mark: u64) -> Result<MarkVersions, ClientError> {
        if let Some((m, v)) = &*self.mark_versions.lock().unwrap_or_else(|p| p.into_inner()) {
            if *m == mark {
                return Ok(Arc::clone(v));
            }
        }
        let n = self.lock().len();
        let members = self.members_in(&[Health::InSync, Health::Repairing]);
        let got = join_all(
            members
                .iter()
                .map(|(_, _, c)| all_versions(c, &self.volume, mark, self.chunks)),
        )
        .await;
        let mut out = vec![None; n];
        let mut refusal = None;
        for ((i, _, _), r) in members.iter().zip(got) {
            match r {
                Ok(v) => out[*i] = Some(v),
                Err(e) => {
                    if replica_fault(&e) {
                        self.mark_out(*i, &e.to_string());
                    }
                    refusal = Some(e);
                }
            }
        }
        // A majority must answer: it includes a replica that had every write acknowledged
        // before the cut, whose versions then lead; fewer could all be stale.
        let have = out.iter().filter(|v| v.is_some()).count();
        if have < self.quorum() {
            return Err(match refusal {
                Some(e) if !replica_fault(&e) && have == 0 => e,
                _ => self.quorum_error(have, "too few replicas hold the mark"),
            });
        }
        let v = Arc::new(out);
        *self.mark_versions.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((mark, Arc::clone(&v)));
        Ok(v)
    }

    /// Chunk `chunk` as it was at `mark`, from a replica with its highest version there.
    pub async fn read_mark(
        &self,
        mark: u64,
        chunk: u64,
    ) -> Result<(ChunkInfo, Bytes), ClientError> {
        let versions = self.versions_at(mark).await?;
        let at = |i: usize| {
            versions[i]
                .as_ref()
                .and_then(|v| v.get(chunk as usize))
                .copied()
        };
        let best = (0..versions.len()).filter_map(at).max();
        let members = self.members_in(&[Health::InSync, Health::Repairing]);
        let mut last = None;
        for (i, h, c) in members {
            if best.is_none() || at(i) != best {
                continue;
            }
            let req = Request::ReadMark {
                volume: self.volume.clone(),
                mark,
                chunk,
            };
            match self.send(&[(i, h, c)], &req).await.pop().map(|(_, _, r)| r) {
                Some(Ok(Response::MarkChunk { info, data })) => return Ok((info, data)),
                Some(Ok(_)) => return Err(unexpected("ReadMark")),
                Some(Err(e)) if !replica_fault(&e) => return Err(e),
                Some(Err(e)) => last = Some(e),
                None => {}
            }
        }
        Err(last.unwrap_or_else(|| self.quorum_error(0, "no replica holding the mark answered")))
    }
}
