//! nf_tables set-element messages (`NFNL_SUBSYS_NFTABLES`), sans I/O: [`Encoder`] turns
//! element changes into atomic batches of at most a given size, [`Answers`] reads the
//! kernel's answers to a batch, [`read_dump`] and [`parse_elements`] read a set's
//! elements. The semantics the socket promises (a re-add refreshes, a delete of an
//! absent element succeeds) come from the messages [`Strategy`] chooses.
//!
//! It creates no tables or sets, and sends nothing: `sys::netlink` does.

mod decode;
mod encode;

pub use decode::{parse_elements, read_dump, Answers, BatchSeqs, Dump, ListedElem};
pub use encode::{ElemKind, ElemOp, Encoder, MsgInfo, Strategy};

use super::CodecError;

// <linux/netfilter/nfnetlink.h>, <linux/netfilter/nf_tables.h>
/// The nf_tables subsystem: the high byte of its messages' `nlmsg_type`.
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `nlmsg_type` of the message that opens a batch.
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
/// `nlmsg_type` of the message that closes (and commits) a batch.
pub const NFNL_MSG_BATCH_END: u16 = 0x11;
pub(crate) const NFPROTO_INET: u8 = 1;
/// Adds elements (without `NLM_F_EXCL`, a present one is not an error).
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub(crate) const NFT_MSG_GETSETELEM: u16 = 13;
/// Deletes elements (an absent one is an error).
pub const NFT_MSG_DELSETELEM: u16 = 14;
/// Linux 6.3+: like `DELSETELEM`, but an absent element is not an error.
pub const NFT_MSG_DESTROYSETELEM: u16 = 30;
pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(crate) const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
pub(crate) const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
/// `NFT_NAME_MAXLEN - 1`: longer table and set names are refused.
const NAME_MAX: usize = 255;

/// Bytes of one batch (one `sendmsg`); larger applies are split into several batches.
/// Below the 4 MiB send buffer asked for, and well below the default (208 KiB) too.
pub const BATCH_LIMIT: usize = 128 * 1024;
/// Bytes of the elements of one message: the nested attribute's length is a `u16`, and
/// the kernel copies a rejected message back into its error, so keep it moderate.
pub const ELEMENTS_LIMIT: usize = 32 * 1024;

/// Whether the kernel accepts `name` as a table or set name.
pub fn check_name(name: &str) -> Result<(), CodecError> {
    if name.is_empty() || name.len() > NAME_MAX || name.contains('\0') {
        return Err(CodecError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
